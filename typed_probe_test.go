package pubsub_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// bytesCodec is the identity codec: the value is the message's bytes, so a
// test controls the encoded size exactly.
type bytesCodec struct{}

func (bytesCodec) Encode(v []byte) ([]byte, error) { return v, nil }
func (bytesCodec) Decode(b []byte) ([]byte, error) { return b, nil }

// A typed handler that fails (an error or a panic) is HandlerError, not
// DecodeError: after EvictAfter batches in a row the owner evicts it, and
// Err says so.
func TestTypedHandlerFailureEvicts(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(2))
	for _, tc := range []struct {
		name string
		h    func(context.Context, order, *pubsub.Message) error
	}{
		{"error", func(context.Context, order, *pubsub.Message) error { return errors.New("cannot handle") }},
		{"panic", func(context.Context, order, *pubsub.Message) error { panic("handler bug") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := ownedBy(t, c.Nodes[1], "typed-fail-"+tc.name)
			sub, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
			require.NoError(t, err)
			s, err := sub.Subscribe(ctxT(t), tc.h)
			require.NoError(t, err)
			pub, err := pubsub.NewTopic(c.Nodes[0], name, pubsub.JSONCodec[order]())
			require.NoError(t, err)
			for i := range 2 {
				ack, err := pub.Publish(ctxT(t), order{ID: i})
				require.NoError(t, err)
				require.Equal(t, []pubsub.DeliveryFailure{{Subscriber: s.ID(), Status: pubsub.HandlerError}}, ack.Failures, "publish %d", i)
			}
			select {
			case <-s.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("not evicted after EvictAfter failed batches")
			}
			require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
			assert.Contains(t, s.Err().Error(), pubsub.HandlerError.String())
		})
	}
}

// A raw and a typed subscriber on one topic: bytes the typed codec rejects
// reach the raw one (Delivered) and are DecodeError for the typed one,
// whose handler never runs; a typed publish reaches both.
func TestTypedAndRawSubscribersShareATopic(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-raw")
	rec := newRecorder()
	raw := subscribe(t, c.Nodes[0], name, rec.handler)
	typed, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	var calls atomic.Int32
	var in typedInbox[order]
	ts, err := typed.Subscribe(ctxT(t), func(ctx context.Context, v order, m *pubsub.Message) error {
		calls.Add(1)
		return in.handler(ctx, v, m)
	})
	require.NoError(t, err)

	ack, err := c.Nodes[0].Publish(ctxT(t), name, []byte("not json"))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered, "the raw subscriber")
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: ts.ID(), Status: pubsub.DecodeError}}, ack.Failures)
	assert.Zero(t, calls.Load(), "the typed handler never sees bytes its codec rejected")

	pub, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	ack, err = pub.Publish(ctxT(t), order{ID: 7, Item: "x"})
	mustAccept(t, ack, err, 2)
	assert.Equal(t, []string{"not json", `{"id":7,"item":"x","count":0}`}, rec.of(raw.ID()))
	assert.Equal(t, []order{{ID: 7, Item: "x"}}, in.values())
}

// partialCodec returns a half-filled value with its error: the handler
// must not get it.
type partialCodec struct{ pubsub.Codec[order] }

func (partialCodec) Decode(b []byte) (order, error) {
	if bytes.HasPrefix(b, []byte("partial")) {
		return order{ID: 99}, errors.New("truncated")
	}
	return pubsub.JSONCodec[order]().Decode(b)
}

func TestTypedPartialDecodeNeverReachesTheHandler(t *testing.T) {
	c := newCluster(t, 3, 2, pubsub.WithEvictAfter(1))
	name := ownedBy(t, c.Nodes[1], "typed-partial")
	typed, err := pubsub.NewTopic[order](c.Nodes[0], name, partialCodec{pubsub.JSONCodec[order]()})
	require.NoError(t, err)
	var in typedInbox[order]
	s, err := typed.Subscribe(ctxT(t), in.handler)
	require.NoError(t, err)
	for range 3 { // past EvictAfter
		ack, err := c.Nodes[1].PublishBatch(ctxT(t), name, [][]byte{[]byte(`{"id":1}`), []byte("partial"), []byte(`{"id":2}`)})
		require.NoError(t, err)
		assert.Zero(t, ack.Delivered)
		assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: s.ID(), Status: pubsub.DecodeError}}, ack.Failures)
	}
	assert.Equal(t, []order{{ID: 1}, {ID: 2}, {ID: 1}, {ID: 2}, {ID: 1}, {ID: 2}}, in.values())
	select {
	case <-s.Done():
		t.Fatalf("evicted: %v", s.Err())
	default:
	}
}

// A TypedProducer batch with one value its codec cannot encode: that
// future fails with ErrInvalidMessage naming the type, the others are
// delivered in order.
func TestTypedProducerEncodeFailureSparesTheBatch(t *testing.T) {
	c := newCluster(t, 3, 2)
	name := ownedBy(t, c.Nodes[1], "typed-encfail")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[1], name, rec.handler)
	topic, err := pubsub.NewTopic[unencodable](c.Nodes[0], name, failingCodec{})
	require.NoError(t, err)
	prod, err := pubsub.NewTypedProducer(topic, pubsub.ProducerConfig{BatchSize: 10, Linger: time.Hour})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	var fs []*pubsub.Produced
	for i := range 10 {
		fs = append(fs, prod.Produce(ctxT(t), unencodable{Bad: i == 4}))
	}
	require.NoError(t, prod.Flush(ctxT(t)))
	for i, f := range fs {
		ack, err := f.Wait(ctxT(t))
		if i == 4 {
			require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
			assert.Contains(t, err.Error(), "unencodable")
			assert.Contains(t, err.Error(), "cannot encode a bad value")
			assert.Equal(t, pubsub.ReasonInvalidMessage, ack.Reason)
			continue
		}
		require.NoError(t, err, "message %d", i)
		assert.Equal(t, 1, ack.Delivered, "message %d", i)
	}
	assert.Len(t, rec.of(s.ID()), 9)
	st := prod.Stats()
	assert.Equal(t, pubsub.ProducerStats{Accepted: 9, Rejected: 1, ByReason: map[pubsub.Reason]uint64{pubsub.ReasonInvalidMessage: 1}}, st, "the producer's counts")
}

// Values near MaxMessageSize, with a key and a header, through a remote
// owner to a remote subscriber: the largest that fits is delivered whole,
// one byte more is ErrTooLarge at the publisher, for Publish and for the
// TypedProducer alike.
func TestTypedHugeValues(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-huge")
	var got atomic.Int64
	sub, err := pubsub.NewTopic[[]byte](c.Nodes[2], name, bytesCodec{})
	require.NoError(t, err)
	_, err = sub.Subscribe(ctxT(t), func(_ context.Context, v []byte, _ *pubsub.Message) error {
		got.Store(int64(len(v)))
		return nil
	})
	require.NoError(t, err)
	pub, err := pubsub.NewTopic[[]byte](c.Nodes[0], name, bytesCodec{})
	require.NoError(t, err)
	limit := c.Nodes[0].MaxMessageSize()

	ack, err := pub.Publish(ctxT(t), bytes.Repeat([]byte{'x'}, limit))
	mustAccept(t, ack, err, 1)
	assert.EqualValues(t, limit, got.Load())

	m := pubsub.Outgoing{Key: strings.Repeat("k", 100), Header: pubsub.Header{"h": {strings.Repeat("v", 1000)}}}
	ack, err = pub.PublishMessage(ctxT(t), bytes.Repeat([]byte{'y'}, limit-2000), m)
	mustAccept(t, ack, err, 1)
	assert.EqualValues(t, limit-2000, got.Load())
	_, err = pub.PublishMessage(ctxT(t), bytes.Repeat([]byte{'y'}, limit-1000), m)
	require.ErrorIs(t, err, pubsub.ErrTooLarge, "the key and header count towards the limit")

	_, err = pub.Publish(ctxT(t), bytes.Repeat([]byte{'x'}, limit+1))
	require.ErrorIs(t, err, pubsub.ErrTooLarge)

	prod, err := pubsub.NewTypedProducer(pub, pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	_, err = prod.Produce(ctxT(t), bytes.Repeat([]byte{'x'}, limit+1)).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTooLarge)
	for _, size := range []int{limit, limit - 1} {
		ack, err := prod.Produce(ctxT(t), bytes.Repeat([]byte{'z'}, size)).Wait(ctxT(t))
		require.NoError(t, err, "size %d", size)
		assert.Equal(t, 1, ack.Delivered)
	}
	ack, err = prod.ProduceMessage(ctxT(t), bytes.Repeat([]byte{'w'}, limit-2000), m).Wait(ctxT(t))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
	_, err = prod.ProduceMessage(ctxT(t), bytes.Repeat([]byte{'w'}, limit-1000), m).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTooLarge, "the key and header count towards the limit")
}

// Many goroutines publishing typed values to one topic, each through its
// own Topic or a shared one, plus a shared TypedProducer: every value
// reaches both subscribers once.
func TestTypedConcurrentPublishers(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-conc")
	var ins [2]typedInbox[order]
	for i, n := range []*pubsub.Node{c.Nodes[1], c.Nodes[2]} {
		typed, err := pubsub.NewTopic(n, name, pubsub.JSONCodec[order]())
		require.NoError(t, err)
		_, err = typed.Subscribe(ctxT(t), ins[i].handler)
		require.NoError(t, err)
	}
	shared, err := pubsub.NewTopic(c.Nodes[0], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	prod, err := pubsub.NewTypedProducer(shared, pubsub.ProducerConfig{})
	require.NoError(t, err)
	const goroutines, each = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*each)
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				v := order{ID: g*1000 + i, Item: fmt.Sprint("g", g)}
				var ack pubsub.PublishAck
				var err error
				switch g % 3 {
				case 0:
					ack, err = shared.Publish(ctxT(t), v)
				case 1:
					ack, err = prod.Produce(ctxT(t), v).Wait(ctxT(t))
				default:
					var own *pubsub.Topic[order]
					if own, err = pubsub.NewTopic(c.Nodes[g%3], name, pubsub.JSONCodec[order]()); err == nil {
						ack, err = own.Publish(ctxT(t), v)
					}
				}
				if err == nil && (ack.Delivered != 2 || len(ack.Failures) != 0) {
					err = fmt.Errorf("ack %+v", ack)
				}
				if err != nil {
					errs <- fmt.Errorf("goroutine %d message %d: %w", g, i, err)
				}
			}
		}()
	}
	wg.Wait()
	require.NoError(t, prod.Close(ctxT(t)))
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i := range ins {
		got := ins[i].values()
		require.Len(t, got, goroutines*each)
		seen := map[int]bool{}
		for _, v := range got {
			require.False(t, seen[v.ID], "subscriber %d got %d twice", i, v.ID)
			seen[v.ID] = true
		}
	}
}
