package pubsub_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Publish answered at its deadline. Before the publisher told the owner how
// long it waits, a Publish whose ctx deadline came before the owner's own
// wait (SubscriberTimeout + RequestTimeout/2) ended with the ctx's error
// whenever one subscriber was slow, and its caller learnt nothing of the
// subscribers that had run the batch. Now the owner answers just before
// the deadline, the subscribers not yet reported listed as Timeout (a
// node reports its subscribers together: all of a node not heard from);
// their delivery goes on, and only its real outcome counts towards
// eviction.
func TestPublishAnsweredAtItsDeadlineListsWhoRan(t *testing.T) {
	for _, tc := range []struct {
		name      string
		publisher int // index into the cluster: 0 "p" (remote owner), 1 "o" (the owner)
	}{{"remote owner", 0}, {"local owner", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			c := heteroCluster(t, [3][]pubsub.Option{nil, {pubsub.WithEvictAfter(1)}, nil})
			topic := topicOwnedByEveryView(t, c, "o")
			release := make(chan struct{})
			var released bool
			t.Cleanup(func() {
				if !released {
					close(release)
				}
			})
			blocked := func(context.Context, *pubsub.Message) error { <-release; return nil }
			slow := subscribe(t, c.Nodes[2], topic, blocked)
			slowMember, err := c.Nodes[2].Subscribe(ctxT(t), topic, blocked, pubsub.WithGroup("g"))
			require.NoError(t, err)
			rec := newRecorder()
			// Not on "s": a node reports its subscribers together, so one
			// beside the slow ones is unknown too until "s" reports.
			fastIDs := []pubsub.SubscriberID{subscribe(t, c.Nodes[0], topic, rec.handler).ID(), subscribe(t, c.Nodes[1], topic, rec.handler).ID()}
			_, err = c.Nodes[0].Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("h"))
			require.NoError(t, err)
			pub, owner := c.Nodes[tc.publisher], c.Nodes[1]

			// Answered 250 ms before the deadline: the fast subscribers
			// have reported by then even on a loaded machine.
			ctx, cancel := context.WithTimeout(ctxT(t), 1500*time.Millisecond)
			defer cancel()
			start := time.Now()
			ack, err := pub.Publish(ctx, topic, msg(0))
			elapsed := time.Since(start)
			require.NoError(t, err, "the owner's answer must come before the deadline")
			assert.Less(t, elapsed, 1500*time.Millisecond)
			assert.Greater(t, elapsed, 750*time.Millisecond, "answered long before the deadline: the slow subscribers cannot have reported")
			require.Equal(t, pubsub.Accepted, ack.Status)
			assert.Equal(t, 3, ack.Delivered, "the two fast subscribers and group h: %+v", ack)
			assert.ElementsMatch(t, []pubsub.DeliveryFailure{
				{Subscriber: slow.ID(), Status: pubsub.Timeout},
				{Subscriber: slowMember.ID(), Status: pubsub.Timeout, Group: "g"},
			}, ack.Failures)
			for _, id := range fastIDs {
				assert.Equal(t, []string{string(msg(0))}, rec.of(id), "subscriber %s", id)
			}
			assert.Equal(t, uint64(1), owner.Stats().AnsweredEarly)

			// Their delivery went on: released within SubscriberTimeout,
			// they ran it, and with EvictAfter 1 the Timeout of the early
			// answer would have evicted them.
			close(release)
			released = true
			ack, err = pub.Publish(ctxT(t), topic, msg(1))
			require.NoError(t, err)
			assert.Equal(t, 5, ack.Delivered, "the slow subscribers were evicted for the early answer's Timeout: %+v", ack)
			assert.Empty(t, ack.Failures)
			assert.Zero(t, owner.Stats().Evictions)
		})
	}
}

// TestPublisherWithShorterTimeoutsThanTheOwner: a publishing node whose
// SubscriberTimeout + RequestTimeout is shorter than the owner's wait for
// a slow subscriber (a rolling configuration change lowering them) got
// ErrTimeout for every batch the slow subscriber held up, from Publish and
// from a default producer alike. Its node now tells the owner how long it
// waits, and the owner answers in time.
func TestPublisherWithShorterTimeoutsThanTheOwner(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{
		{pubsub.WithSubscriberTimeout(500 * time.Millisecond), pubsub.WithRequestTimeout(500 * time.Millisecond)},
		nil, // fast: the owner waits 2s + 1.5s for a node's report
		nil,
	})
	topic := topicOwnedByEveryView(t, c, "o")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	slow := subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { <-release; return nil })
	rec := newRecorder()
	healthy := subscribe(t, c.Nodes[1], topic, rec.handler) // not beside the slow one: see above

	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: slow.ID(), Status: pubsub.Timeout}}, ack.Failures)
	assert.Equal(t, []string{string(msg(0))}, rec.of(healthy.ID()))

	// A default producer on that node: its PublishTimeout follows its own
	// node's timeouts.
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close(context.Background()) })
	ack, err = p.Produce(ctxT(t), msg(1)).Wait(ctxT(t))
	require.NoError(t, err)
	assert.Equal(t, pubsub.Accepted, ack.Status)
	assert.Equal(t, 1, ack.Delivered)
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: slow.ID(), Status: pubsub.Timeout}}, ack.Failures)
}

// TestPublishAnsweredAtItsDeadlineListsAReroutedShare: a group member's
// share re-routed after its mailbox was full, to a member still running
// when the publisher's deadline comes, is listed as that member's Timeout
// in the group's name; the group is not counted as delivered, nor left out.
func TestPublishAnsweredAtItsDeadlineListsAReroutedShare(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{nil, nil, {pubsub.WithMailboxSize(1)}})
	topic := topicOwnedByEveryView(t, c, "o")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	started := make(chan struct{}, 3)
	blocked := func(context.Context, *pubsub.Message) error { started <- struct{}{}; <-release; return nil }
	var members []pubsub.SubscriberID
	for range 2 {
		s, err := c.Nodes[2].Subscribe(ctxT(t), topic, blocked, pubsub.WithGroup("g"))
		require.NoError(t, err)
		members = append(members, s.ID())
	}
	keyed := []pubsub.Outgoing{{Data: msg(0), Key: "k"}} // one key: one member, every batch
	// The key's member runs the first batch, and queues the second once
	// its handler took the first: its mailbox (1 batch) is then full. Sent
	// before the handler took the first, the second found the mailbox full
	// and went to the other member.
	publishAccepted := func() {
		_, err := c.Nodes[0].PublishMessages(ctxT(t), topic, keyed, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err)
	}
	publishAccepted()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the key's member never ran the first batch")
	}
	publishAccepted()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[2].Stats().MaxMailboxDepth >= 1 }, "the member's mailbox never filled")

	ctx, cancel := context.WithTimeout(ctxT(t), 800*time.Millisecond)
	defer cancel()
	ack, err := c.Nodes[0].PublishMessages(ctx, topic, keyed)
	require.NoError(t, err)
	assert.Zero(t, ack.Delivered, "%+v", ack)
	require.Len(t, ack.Failures, 1, "%+v", ack)
	f := ack.Failures[0]
	assert.Equal(t, pubsub.Timeout, f.Status)
	assert.Equal(t, "g", f.Group)
	assert.Contains(t, members, f.Subscriber)
}

// TestSplitBatchAnsweredAtTheDeadlineStillReachesASlowSubscriber: a batch
// too large for one request goes in chunks, and a subscriber that failed a
// chunk gets no later one. A slow subscriber listed Timeout only because
// the answer went at the publisher's deadline (its node had not reported)
// was skipped that way too, and got 1 message of 4 (found by a probe of
// this feature; 2 of 2 runs). Its delivery goes on, so it gets the later chunks, in
// order; the ack still lists it as Timeout, outcome unknown. The
// publisher waits 1 s a chunk, so the owner answers about 125 ms before
// that (an eighth then; a quarter, 250 ms, since): with 500 ms and about 62 ms, a loaded CI run saw the
// answer arrive late once (ErrTimeout) in 7.
func TestSplitBatchAnsweredAtTheDeadlineStillReachesASlowSubscriber(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{
		{pubsub.WithSubscriberTimeout(500 * time.Millisecond), pubsub.WithRequestTimeout(500 * time.Millisecond)}, nil, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	rec := newRecorder()
	slow := subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		time.Sleep(1200 * time.Millisecond) // longer than the publisher waits for a chunk
		return rec.handler(ctx, m)
	})
	size := c.Nodes[0].MaxMessageSize() * 2 / 3 // one message per chunk
	var batch [][]byte
	var want []string
	for i := range 4 {
		m := append(bytes.Repeat([]byte{'x'}, size), msg(i)...)
		batch = append(batch, m)
		want = append(want, string(m))
	}
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, batch)
	require.NoError(t, err)
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: slow.ID(), Status: pubsub.Timeout}}, ack.Failures)
	deadline := time.Now().Add(10 * time.Second)
	for rec.total() < len(batch) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling for the condition, with a deadline
	}
	assert.Equal(t, want, rec.of(slow.ID()), "the slow subscriber got %d of the batch's %d messages", rec.total(), len(batch))
}
