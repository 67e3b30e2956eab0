package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// TestSameShortRequestTimeoutEverywhereDoesNotAnswerEarly: with the same
// timeouts on every node the publisher waits SubscriberTimeout +
// RequestTimeout, longer than the owner's own wait, so nothing needs an
// answer at its deadline ("same timeouts, no cost"). With a short
// RequestTimeout (100 ms here, 3 s SubscriberTimeout) the owner answered
// 250 ms before the publisher's wait ended anyway: 150 ms before
// SubscriberTimeout, listing a subscriber that ran the batch within it as
// Timeout.
func TestSameShortRequestTimeoutEverywhereDoesNotAnswerEarly(t *testing.T) {
	same := []pubsub.Option{pubsub.WithSubscriberTimeout(3 * time.Second), pubsub.WithRequestTimeout(100 * time.Millisecond)}
	for _, tc := range []struct {
		name      string
		publisher int // 0 "p" (remote owner), 1 "o" (the owner)
	}{{"remote owner", 0}, {"local owner", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			c := heteroCluster(t, [3][]pubsub.Option{same, same, same})
			topic := topicOwnedByEveryView(t, c, "o")
			// Well within the 3 s SubscriberTimeout, after 2.85 s.
			slow := subscribe(t, c.Nodes[2], topic, func(ctx context.Context, _ *pubsub.Message) error {
				select {
				case <-time.After(2920 * time.Millisecond):
				case <-ctx.Done():
				}
				return nil
			})
			ack, err := c.Nodes[tc.publisher].Publish(ctxT(t), topic, msg(0))
			require.NoError(t, err)
			assert.Equal(t, 1, ack.Delivered, "%+v", ack)
			assert.Empty(t, ack.Failures, "subscriber %s ran the batch within SubscriberTimeout", slow.ID())
			assert.Zero(t, c.Nodes[1].Stats().AnsweredEarly)
		})
	}
}

// TestPublishWithAVeryShortDeadline: a deadline of a few milliseconds, or
// one already past when the request reaches the owner, ends the call with
// the ctx's error or an Accepted ack listing the blocked subscriber as
// Timeout, never both nor neither; the early Timeouts never evict it
// (EvictAfter 1), and an older publisher (no answer_within) is never
// answered early.
func TestPublishWithAVeryShortDeadline(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{{pubsub.WithSilentWaitForTest()}, {pubsub.WithEvictAfter(1)}, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	release := make(chan struct{})
	released := false
	t.Cleanup(func() {
		if !released {
			close(release)
		}
	})
	blocked := subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { <-release; return nil })
	for _, pub := range []int{1, 2, 0} { // the owner (local), a remote one, the older one
		for _, d := range []time.Duration{time.Nanosecond, time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond} {
			ctx, cancel := context.WithTimeout(ctxT(t), d)
			ack, err := c.Nodes[pub].Publish(ctx, topic, msg(0))
			cancel()
			if err != nil {
				assert.ErrorIs(t, err, context.DeadlineExceeded, "node %d, %v", pub, d)
				continue
			}
			assert.NotEqual(t, 0, pub, "the older publisher was answered early: %+v", ack)
			assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: blocked.ID(), Status: pubsub.Timeout}}, ack.Failures, "%v", d)
		}
	}
	owner := c.Nodes[1]
	close(release)
	released = true
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(1))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered, "evicted for an early Timeout: %+v", ack)
	assert.Zero(t, owner.Stats().Evictions)
}

// TestProducerWithAShortPublishTimeoutKeepsOrder: a producer whose
// PublishTimeout is shorter than the owner's wait, four batches in flight,
// and a slow (not stuck) subscriber: every attempt is answered in time,
// Accepted with the slow subscriber Timeout or Delivered (never retried,
// never rejected), Stats counts each message once, and the slow
// subscriber, its delivery going on, gets every message once, in order.
func TestProducerWithAShortPublishTimeoutKeepsOrder(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{nil, {pubsub.WithEvictAfter(1)}, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	rec := newRecorder()
	slow := subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		time.Sleep(40 * time.Millisecond)
		return rec.handler(ctx, m)
	})
	const n = 12
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{
		BatchSize: 1, MaxInFlight: 4, PublishTimeout: 150 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(10 * time.Millisecond) },
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close(context.Background()) })
	var futs []*pubsub.Produced
	for i := range n {
		futs = append(futs, p.Produce(ctxT(t), msg(i)))
	}
	early := 0
	for i, f := range futs {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, "message %d", i)
		require.Equal(t, pubsub.Accepted, ack.Status)
		if len(ack.Failures) > 0 {
			early++
			assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: slow.ID(), Status: pubsub.Timeout}}, ack.Failures)
		} else {
			assert.Equal(t, 1, ack.Delivered)
		}
	}
	assert.Positive(t, early, "no batch was answered early: the test does not test it")
	st := p.Stats()
	assert.Equal(t, uint64(n), st.Accepted)
	assert.Zero(t, st.Rejected)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return rec.total() >= n }, "the slow subscriber never got every message")
	want := make([]string, n)
	for i := range want {
		want[i] = string(msg(i))
	}
	assert.Equal(t, want, rec.of(slow.ID()))
	assert.Zero(t, c.Nodes[1].Stats().Evictions)
}
