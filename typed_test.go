package pubsub_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/codec/protocodec"
)

type order struct {
	ID    int    `json:"id"`
	Item  string `json:"item"`
	Count int    `json:"count"`
}

// typedInbox collects a typed handler's values with their messages.
type typedInbox[T any] struct {
	mu   sync.Mutex
	vals []T
	msgs []pubsub.Message
}

func (in *typedInbox[T]) handler(_ context.Context, v T, m *pubsub.Message) error {
	in.mu.Lock()
	in.vals = append(in.vals, v)
	in.msgs = append(in.msgs, *m)
	in.mu.Unlock()
	return nil
}

func (in *typedInbox[T]) values() []T {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]T(nil), in.vals...)
}

func TestTypedTopicRoundTripJSON(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-json")
	sub, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	var in typedInbox[order]
	_, err = sub.Subscribe(ctxT(t), in.handler)
	require.NoError(t, err)

	pub, err := pubsub.NewTopic(c.Nodes[0], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	assert.Equal(t, name, pub.Name())
	ack, err := pub.Publish(ctxT(t), order{ID: 1, Item: "widget", Count: 3})
	mustAccept(t, ack, err, 1)
	ack, err = pub.PublishMessage(ctxT(t), order{ID: 2, Item: "gadget"}, pubsub.Outgoing{Key: "customer-9", Header: pubsub.Header{"tenant": {"acme"}}})
	mustAccept(t, ack, err, 1)

	require.Equal(t, []order{{ID: 1, Item: "widget", Count: 3}, {ID: 2, Item: "gadget"}}, in.values())
	in.mu.Lock()
	defer in.mu.Unlock()
	assert.Equal(t, `{"id":1,"item":"widget","count":3}`, string(in.msgs[0].Data), "the handler sees the bytes too")
	assert.Equal(t, "customer-9", in.msgs[1].Key)
	assert.Equal(t, "acme", in.msgs[1].Header.Get("tenant"))
	assert.Equal(t, c.Nodes[0].ID(), in.msgs[1].Publisher)
}

func TestTypedTopicRoundTripProtobuf(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-proto")
	codec := protocodec.New[*wrapperspb.StringValue]()
	sub, err := pubsub.NewTopic(c.Nodes[2], name, codec)
	require.NoError(t, err)
	var in typedInbox[*wrapperspb.StringValue]
	_, err = sub.Subscribe(ctxT(t), in.handler)
	require.NoError(t, err)
	pub, err := pubsub.NewTopic(c.Nodes[0], name, codec)
	require.NoError(t, err)
	for _, v := range []string{"one", "", "three"} {
		ack, err := pub.Publish(ctxT(t), wrapperspb.String(v))
		mustAccept(t, ack, err, 1)
	}
	got := in.values()
	require.Len(t, got, 3)
	for i, v := range []string{"one", "", "three"} {
		assert.True(t, proto.Equal(wrapperspb.String(v), got[i]), "value %d = %v", i, got[i])
	}
}

// unencodable fails to encode when Bad is set.
type unencodable struct{ Bad bool }

type failingCodec struct{}

func (failingCodec) Encode(v unencodable) ([]byte, error) {
	if v.Bad {
		return nil, fmt.Errorf("cannot encode a bad value")
	}
	return []byte("ok"), nil
}

func (failingCodec) Decode(data []byte) (unencodable, error) { return unencodable{}, nil }

// panickyCodec panics on the values failingCodec refuses, as a
// hand-written codec dereferencing a nil field would.
type panickyCodec struct{ failingCodec }

func (panickyCodec) Encode(v unencodable) ([]byte, error) {
	if v.Bad {
		panic("nil field")
	}
	return []byte("ok"), nil
}

// A codec whose Encode panics rejects the value as one returning an error
// does: ErrInvalidMessage from Publish and from the producer's future,
// naming the panic, and neither stops. It used to panic out of Publish
// and Produce, in the caller's goroutine.
func TestTypedEncodePanicIsAnInvalidMessage(t *testing.T) {
	c := newCluster(t, 3, 2)
	name := ownedBy(t, c.Nodes[1], "encode-panic")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[1], name, rec.handler)
	topic, err := pubsub.NewTopic[unencodable](c.Nodes[0], name, panickyCodec{})
	require.NoError(t, err)
	ack, err := topic.Publish(ctxT(t), unencodable{Bad: true})
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	assert.Contains(t, err.Error(), "nil field")
	assert.Equal(t, pubsub.ReasonInvalidMessage, ack.Reason)
	ack, err = topic.Publish(ctxT(t), unencodable{})
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)

	prod, err := pubsub.NewTypedProducer(topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	_, err = prod.Produce(ctxT(t), unencodable{Bad: true}).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	assert.Contains(t, err.Error(), "nil field")
	ack, err = prod.Produce(ctxT(t), unencodable{}).Wait(ctxT(t))
	require.NoError(t, err, "the producer goes on after a value whose encoding panicked")
	assert.Equal(t, 1, ack.Delivered)
	assert.Len(t, rec.of(s.ID()), 2, "only the two encodable values were sent")
}

func TestTypedEncodeFailureIsRejectedAtThePublisher(t *testing.T) {
	c := newCluster(t, 3, 2)
	topic, err := pubsub.NewTopic[unencodable](c.Nodes[0], ownedBy(t, c.Nodes[1], "unencodable"), failingCodec{})
	require.NoError(t, err)
	ack, err := topic.Publish(ctxT(t), unencodable{Bad: true})
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	assert.Equal(t, pubsub.ReasonInvalidMessage, ack.Reason)
	assert.Equal(t, pubsub.Rejected, ack.Status)

	prod, err := pubsub.NewTypedProducer(topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	_, err = prod.Produce(ctxT(t), unencodable{Bad: true}).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	ack, err = prod.Produce(ctxT(t), unencodable{}).Wait(ctxT(t))
	require.NoError(t, err, "the producer goes on after a value it could not encode")
	assert.Equal(t, pubsub.Accepted, ack.Status)

	_, err = pubsub.NewTopic(c.Nodes[0], "bad topic", pubsub.JSONCodec[int]())
	require.ErrorIs(t, err, pubsub.ErrInvalidTopic)
	_, err = pubsub.NewTopic[int](c.Nodes[0], "t", nil)
	require.ErrorIs(t, err, pubsub.ErrInvalidConfig)
}

// Bytes a typed subscriber's codec rejects never reach its handler, are
// reported as DecodeError, never evict, and never stop the valid messages
// of the same batch or of later ones.
func TestDecodeErrorIsReportedAndNeverEvicts(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(2))
	name := ownedBy(t, c.Nodes[1], "garbage")
	typed, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	var in typedInbox[order]
	s, err := typed.Subscribe(ctxT(t), in.handler)
	require.NoError(t, err)
	valid := func(id int) []byte { return fmt.Appendf(nil, `{"id":%d}`, id) }

	const rounds = 5 // well past EvictAfter
	for r := range rounds {
		ack, err := c.Nodes[0].PublishBatch(ctxT(t), name, [][]byte{valid(2 * r), []byte("not json"), valid(2*r + 1)})
		require.NoError(t, err)
		assert.Equal(t, 0, ack.Delivered, "a subscriber that skipped a message did not process the whole batch")
		require.Len(t, ack.Failures, 1)
		assert.Equal(t, pubsub.DeliveryFailure{Subscriber: s.ID(), Status: pubsub.DecodeError}, ack.Failures[0])
	}
	select {
	case <-s.Done():
		t.Fatalf("subscription ended: %v", s.Err())
	default:
	}
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), name, [][]byte{valid(100)})
	mustAccept(t, ack, err, 1)
	var want []order
	for id := range 2 * rounds {
		want = append(want, order{ID: id})
	}
	want = append(want, order{ID: 100})
	assert.Equal(t, want, in.values(), "every valid message reached the handler, in order")
	assert.Equal(t, "decode-error", pubsub.DecodeError.String())
}

func TestTypedProducerKeepsOrder(t *testing.T) {
	c := newCluster(t, 3, 3)
	name := ownedBy(t, c.Nodes[1], "typed-order")
	var ins [2]typedInbox[order]
	for i, n := range []*pubsub.Node{c.Nodes[0], c.Nodes[2]} {
		typed, err := pubsub.NewTopic(n, name, pubsub.JSONCodec[order]())
		require.NoError(t, err)
		_, err = typed.Subscribe(ctxT(t), ins[i].handler)
		require.NoError(t, err)
	}
	topic, err := pubsub.NewTopic(c.Nodes[0], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	prod, err := pubsub.NewTypedProducer(topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 16})
	require.NoError(t, err)
	require.Equal(t, name, prod.Producer().Topic())
	const count = 1000
	futures := make([]*pubsub.Produced, count)
	for i := range futures {
		if i%2 == 0 {
			futures[i] = prod.Produce(ctxT(t), order{ID: i})
		} else {
			futures[i] = prod.ProduceMessage(ctxT(t), order{ID: i}, pubsub.Outgoing{Key: fmt.Sprint(i % 7)})
		}
	}
	require.NoError(t, prod.Flush(ctxT(t)))
	for i, f := range futures {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, "message %d", i)
		require.Equal(t, 2, ack.Delivered)
	}
	require.NoError(t, prod.Close(ctxT(t)))
	for i := range ins {
		got := ins[i].values()
		require.Len(t, got, count)
		for j, v := range got {
			require.Equal(t, j, v.ID, "subscriber %d: message %d out of order", i, j)
		}
	}
}

// u64Codec reads 8 big-endian bytes and, as hand-written codecs may,
// panics on a shorter buffer instead of returning an error.
type u64Codec struct{}

func (u64Codec) Encode(v uint64) ([]byte, error) { return binary.BigEndian.AppendUint64(nil, v), nil }
func (u64Codec) Decode(b []byte) (uint64, error) { return binary.BigEndian.Uint64(b), nil }

// Found in review: a codec whose Decode panicked on a publisher's garbage
// made the batch HandlerError, which stopped the batch's later valid
// messages and, after EvictAfter batches, evicted the subscriber. A panic
// in Decode is the codec rejecting the bytes: DecodeError.
func TestDecodePanicIsADecodeError(t *testing.T) {
	c := newCluster(t, 2, 2, pubsub.WithEvictAfter(2))
	name := ownedBy(t, c.Nodes[1], "decode-panic")
	typed, err := pubsub.NewTopic[uint64](c.Nodes[1], name, u64Codec{})
	require.NoError(t, err)
	var in typedInbox[uint64]
	s, err := typed.Subscribe(ctxT(t), in.handler)
	require.NoError(t, err)
	enc := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
	const rounds = 5 // well past EvictAfter
	var want []uint64
	for r := range uint64(rounds) {
		ack, err := c.Nodes[0].PublishBatch(ctxT(t), name, [][]byte{enc(2 * r), []byte("short"), enc(2*r + 1)})
		require.NoError(t, err)
		require.Len(t, ack.Failures, 1, "round %d", r)
		assert.Equal(t, pubsub.DeliveryFailure{Subscriber: s.ID(), Status: pubsub.DecodeError}, ack.Failures[0], "round %d", r)
		want = append(want, 2*r, 2*r+1)
	}
	select {
	case <-s.Done():
		t.Fatalf("subscription ended: %v", s.Err())
	default:
	}
	assert.Equal(t, want, in.values(), "every valid message reached the handler, in order")
}

// A batch with bytes the codec rejects, whose other messages the typed
// handler ran without error, is no failure of the subscriber: it must not
// bridge two failed batches into "EvictAfter failures in a row".
func TestDecodeErrorBatchBreaksAFailureStreak(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(2))
	name := ownedBy(t, c.Nodes[1], "decode-streak")
	typed, err := pubsub.NewTopic(c.Nodes[2], name, pubsub.JSONCodec[order]())
	require.NoError(t, err)
	s, err := typed.Subscribe(ctxT(t), func(_ context.Context, v order, _ *pubsub.Message) error {
		if v.Count < 0 {
			return errors.New("cannot handle a negative count")
		}
		return nil
	})
	require.NoError(t, err)
	poison, valid := []byte(`{"id":1,"count":-1}`), []byte(`{"id":2}`)
	for i, tc := range []struct {
		batch [][]byte
		want  pubsub.DeliveryStatus
	}{
		{[][]byte{poison}, pubsub.HandlerError},
		{[][]byte{valid, []byte("not json"), valid}, pubsub.DecodeError}, // the handler ran both valid messages
		{[][]byte{poison}, pubsub.HandlerError},
	} {
		ack, err := c.Nodes[0].PublishBatch(ctxT(t), name, tc.batch)
		require.NoError(t, err)
		require.Equal(t, []pubsub.DeliveryFailure{{Subscriber: s.ID(), Status: tc.want}}, ack.Failures, "batch %d", i)
	}
	// The owner accounts a batch before it handles the next one: an
	// eviction would show here as a subscriber missing from the ack.
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), name, [][]byte{valid})
	mustAccept(t, ack, err, 1)
	select {
	case <-s.Done():
		t.Fatalf("evicted: %v", s.Err())
	default:
	}
}
