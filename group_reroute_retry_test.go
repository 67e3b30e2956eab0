package pubsub_test

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// memberRuns logs which group member ran each message, by data.
type memberRuns struct {
	mu  sync.Mutex
	ran map[string][]string
}

func (r *memberRuns) record(id string, m *pubsub.Message) {
	r.mu.Lock()
	r.ran[string(m.Data)] = append(r.ran[string(m.Data)], id)
	r.mu.Unlock()
}

// of returns the members that ran data, in order.
func (r *memberRuns) of(data string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ran[data]...)
}

// stuckMembers subscribes members of group "g" to topic: one per stuck ID
// on node 2, each blocked in its handler until the test ends with a
// mailbox of one batch, and Y on node 0, which runs what it gets. It then
// fills the stuck members' mailboxes (fillMailboxes), so their later
// shares fail MailboxFull and are re-routed to Y.
func stuckMembers(t *testing.T, c *testcluster.Cluster, topic string, stuck ...string) *memberRuns {
	t.Helper()
	runs := &memberRuns{ran: map[string][]string{}}
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	for _, id := range stuck {
		_, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
			runs.record(id, m)
			<-release
			return nil
		}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("Y", m)
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	fillMailboxes(t, c, topic, runs, stuck...)
	return runs
}

// fillMailboxes publishes one-message "fill" batches to topic from node 0
// until each stuck member (a member of group "g" whose handler holds the
// fills it runs, with a mailbox of one batch) runs one, then two rounds
// more, so that round robin gives each of them one that waits in its
// mailbox, now full, and the rest, refused, are re-routed to Y; it returns
// once every fill but those ran. Published all at once, the fills were
// all placed while, under load, a member's first still sat in its mailbox
// not yet picked up: once picked up, the mailbox was empty and the test's
// share for that member ran there instead of being re-routed.
func fillMailboxes(t *testing.T, c *testcluster.Cluster, topic string, runs *memberRuns, stuck ...string) {
	t.Helper()
	published := 0
	fill := func() {
		if _, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("fill")}}, pubsub.WithAck(pubsub.AckAccepted)); err != nil {
			t.Fatal(published, err)
		}
		published++
	}
	holding := func() bool {
		ran := runs.of("fill")
		for _, id := range stuck {
			if !slices.Contains(ran, id) {
				return false
			}
		}
		return true
	}
	deadline := time.Now().Add(10 * time.Second)
	for !holding() {
		if time.Now().After(deadline) {
			t.Fatalf("after %d fills, not every member of %v runs one: fills ran at %v", published, stuck, runs.of("fill"))
		}
		fill()
	}
	for range 2 * (len(stuck) + 1) {
		fill()
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(runs.of("fill")) >= published-len(stuck) },
		"fills not all placed: stuck members' mailboxes not full")
	t.Logf("fills %v", runs.of("fill"))
}

// A producer batch whose attempts time out (a slow broadcast subscriber
// holds the owner's answer) and are retried through the same owner, on an
// at-most-once topic: the member given p1 has a full mailbox each time,
// so p1 is re-routed to the other member on every attempt. A re-route
// carried no producer number to answer a copy by, so that member ran p1
// once per attempt (6 times); it now answers a copy of the share it ran
// with its outcome.
func TestGroupRetriedBatchReroutedShareRunsOnce(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3, pubsub.WithSilentWaitForTest())
	topic := ownedBy(t, c.Nodes[1], "reroute-retry")
	runs := stuckMembers(t, c, topic, "X")
	p, retries := retriedProducer(t, c, topic)
	futs := []*pubsub.Produced{p.Produce(ctxT(t), []byte("p0")), p.Produce(ctxT(t), []byte("p1"))}
	if err := p.Flush(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for _, f := range futs {
		ack, err := f.Wait(ctxT(t))
		t.Logf("ack %+v err %v", ack, err)
	}
	t.Logf("retries %d ran p0 %v p1 %v", retries.Load(), runs.of("p0"), runs.of("p1"))
	if retries.Load() == 0 {
		t.Fatal("the batch was never retried: the test did not run what it names")
	}
	for _, m := range []string{"p0", "p1"} {
		if got := runs.of(m); len(got) > 1 {
			t.Errorf("group ran %s %d times at %v; want at most once", m, len(got), got)
		}
	}
}

// retriedProducer subscribes a broadcast subscriber on node 1 that holds
// the first batch other than a fill until its context ends, so the owner's
// answer to it comes after PublishTimeout (300 ms), and returns a producer
// on node 0 (one batch in flight, sent by Flush) that retries every failed
// attempt through the same owner, with the count of its retries.
func retriedProducer(t *testing.T, c *testcluster.Cluster, topic string) (*pubsub.BatchingProducer, *atomic.Int64) {
	t.Helper()
	var slowOnce atomic.Bool
	subscribe(t, c.Nodes[1], topic, func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data) != "fill" && slowOnce.CompareAndSwap(false, true) {
			<-ctx.Done()
		}
		return nil
	})
	retries := new(atomic.Int64)
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute, PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close(ctxT(t)) })
	return p, retries
}
