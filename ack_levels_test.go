package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// An AckAccepted publish returns once the owner took the batch, while the
// only subscriber's handler is still blocked, whether the owner is the
// publishing node or another one.
func TestAckAcceptedReturnsWhileAHandlerIsBlocked(t *testing.T) {
	c := newCluster(t, 3, 3)
	for name, owner := range map[string]int{"local owner": 0, "remote owner": 1} {
		t.Run(name, func(t *testing.T) {
			topic := ownedBy(t, c.Nodes[owner], "accepted-"+fmt.Sprint(owner))
			release := make(chan struct{})
			defer close(release)
			started := make(chan struct{}, 1)
			subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
				started <- struct{}{}
				<-release
				return nil
			})
			ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckAccepted))
			require.NoError(t, err)
			assert.Equal(t, pubsub.PublishAck{Topic: topic, Status: pubsub.Accepted, Messages: 1, Level: pubsub.AckAccepted}, ack)
			select { // the handler got it, and has not returned
			case <-started:
			case <-time.After(10 * time.Second):
				t.Fatal("the handler never got the accepted message")
			}
		})
	}
}

// At every level a failing subscriber is still evicted: the owner still
// collects the outcomes.
func TestAckLevelsStillEvictFailingSubscribers(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(2))
	for _, level := range []pubsub.AckLevel{pubsub.AckAccepted, pubsub.AckNone} {
		t.Run(level.String(), func(t *testing.T) {
			topic := ownedBy(t, c.Nodes[1], "evict-"+level.String())
			s := subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { return fmt.Errorf("broken") })
			testcluster.WaitFor(t, 10*time.Second, func() bool {
				ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(level))
				require.NoError(t, err)
				require.Equal(t, level, ack.Level)
				require.Zero(t, ack.Delivered)
				require.Empty(t, ack.Failures)
				select {
				case <-s.Done():
					return true
				default:
					return false
				}
			}, "never evicted")
			require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
		})
	}
}

// A pipelined producer keeps its order at every level, and its futures say
// which level they attest; with AckNone every message still arrives when
// nothing fails, intact: with the owner on the producer's node the actor
// reads a batch after its future completed and the producer reused the
// batch (it once delivered empty or shifted messages).
func TestProducerKeepsOrderAtEveryAckLevel(t *testing.T) {
	c := newCluster(t, 3, 3)
	for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
		for where, owner := range map[string]int{"remote owner": 1, "local owner": 0} {
			t.Run(level.String()+"/"+where, func(t *testing.T) { producerOrderAt(t, c, level, owner) })
		}
	}
}

func producerOrderAt(t *testing.T, c *testcluster.Cluster, level pubsub.AckLevel, owner int) {
	topic := ownedBy(t, c.Nodes[owner], fmt.Sprintf("order-%s-%d", level, owner))
	rec := newRecorder()
	s := subscribe(t, c.Nodes[2-owner], topic, rec.handler)
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 50, AckLevel: level})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	const count = 2000
	futures := make([]*pubsub.Produced, count)
	for i := range futures {
		futures[i] = prod.Produce(ctxT(t), msg(i))
	}
	for i, f := range futures {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, "message %d", i)
		require.Equal(t, level, ack.Level)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(rec.of(s.ID())) == count }, "not every message arrived")
	for i, d := range rec.of(s.ID()) {
		require.Equal(t, string(msg(i)), d, "order")
	}
}

// AckNone rejects what the publisher can see itself, with the usual errors,
// and accepts the rest without waiting for the owner.
func TestAckNoneRejectsOnlyLocallyVisibleErrors(t *testing.T) {
	c := newCluster(t, 3, 2)
	none := pubsub.WithAck(pubsub.AckNone)
	topic := ownedBy(t, c.Nodes[1], "fire")
	for name, tc := range map[string]struct {
		topic string
		msgs  []pubsub.Outgoing
		want  error
	}{
		"invalid topic":  {"bad topic", []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.ErrInvalidTopic},
		"too large":      {topic, []pubsub.Outgoing{{Data: make([]byte, c.Nodes[0].MaxMessageSize()+1)}}, pubsub.ErrTooLarge},
		"invalid header": {topic, []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"a b": {"v"}}}}, pubsub.ErrInvalidMessage},
	} {
		t.Run(name, func(t *testing.T) {
			ack, err := c.Nodes[0].PublishMessages(ctxT(t), tc.topic, tc.msgs, none)
			require.ErrorIs(t, err, tc.want)
			assert.Equal(t, pubsub.Rejected, ack.Status)
			assert.Equal(t, pubsub.AckNone, ack.Level)
		})
	}
	var mu sync.Mutex
	got := 0
	subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error {
		mu.Lock()
		got++
		mu.Unlock()
		return nil
	})
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, none)
	require.NoError(t, err)
	assert.Equal(t, pubsub.PublishAck{Topic: topic, Status: pubsub.Accepted, Messages: 1, Level: pubsub.AckNone}, ack)
	testcluster.WaitFor(t, 5*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return got == 1 }, "the message never arrived")

	c.CloseNode(t, 0)
	_, err = c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, none)
	require.ErrorIs(t, err, pubsub.ErrClosed)
	assert.Equal(t, "accepted none delivered AckLevel(9)",
		pubsub.AckAccepted.String()+" "+pubsub.AckNone.String()+" "+pubsub.AckDelivered.String()+" "+pubsub.AckLevel(9).String())
}

// With AckAccepted or AckNone the caller may reuse its bytes once the call
// returned, even when this node owns the topic and its handlers read them
// later.
func TestEarlyAckLevelsLetTheCallerReuseItsBytes(t *testing.T) {
	c := newCluster(t, 1, 1)
	for _, level := range []pubsub.AckLevel{pubsub.AckAccepted, pubsub.AckNone} {
		t.Run(level.String(), func(t *testing.T) {
			topic := "reuse-" + level.String()
			release := make(chan struct{})
			rec := newRecorder()
			s := subscribe(t, c.Nodes[0], topic, func(ctx context.Context, m *pubsub.Message) error {
				<-release // every publish returns before a handler reads
				return rec.handler(ctx, m)
			})
			buf := make([]byte, 4)
			for i := range 200 {
				copy(buf, fmt.Sprintf("%04d", i))
				_, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: buf, Header: pubsub.Header{"i": {fmt.Sprint(i)}}}}, pubsub.WithAck(level))
				require.NoError(t, err)
			}
			close(release)
			testcluster.WaitFor(t, 10*time.Second, func() bool { return len(rec.of(s.ID())) == 200 }, "not every message arrived")
			for i, d := range rec.of(s.ID()) {
				require.Equal(t, fmt.Sprintf("%04d", i), d)
			}
		})
	}
}

func TestAckLevelsOutOfRangeAreRefused(t *testing.T) {
	c := newCluster(t, 1, 1)
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), "t", []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckLevel(7)))
	require.ErrorIs(t, err, pubsub.ErrInvalidConfig)
	assert.Equal(t, pubsub.Rejected, ack.Status)
	// Found in review: the reason was ReasonTimeout ("outcome unknown")
	// and the error wrapped ErrTimeout.
	assert.Equal(t, pubsub.ReasonInvalidConfig, ack.Reason)
	assert.NotErrorIs(t, err, pubsub.ErrTimeout)
	assert.ErrorIs(t, err, ack.Reason.Err())
	_, err = pubsub.NewBatchingProducer(c.Nodes[0], "t", pubsub.ProducerConfig{AckLevel: 7})
	require.ErrorIs(t, err, pubsub.ErrInvalidConfig)
}

// The owner serves runs of AckAccepted publishes as one batch; each call
// still gets its own ack, counting its own messages, and every message
// arrives once.
func TestAckAcceptedAnswersEachPublishOfARun(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "runs")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[2], topic, rec.handler)
	accepted := pubsub.WithAck(pubsub.AckAccepted)
	var wg sync.WaitGroup
	for g := 1; g <= 5; g++ {
		wg.Go(func() {
			for k := range 200 {
				out := make([]pubsub.Outgoing, g)
				for j := range out {
					out[j] = pubsub.Outgoing{Data: fmt.Appendf(nil, "g%d-%d-%d", g, k, j)}
				}
				ack, err := c.Nodes[0].PublishMessages(context.Background(), topic, out, accepted)
				assert.NoError(t, err)
				assert.Equal(t, g, ack.Messages, "an ack counts its own call's messages")
			}
		})
	}
	wg.Wait()
	want := 200 * (1 + 2 + 3 + 4 + 5)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(rec.of(s.ID())) == want }, "not every message arrived")
	seen := map[string]bool{}
	for _, d := range rec.of(s.ID()) {
		require.False(t, seen[d], "%s twice", d)
		seen[d] = true
	}
}
