package pubsub_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// mailboxFullHook counts the MailboxFull outcomes of one node's subscribers.
type mailboxFullHook struct {
	node string
	full atomic.Int64
}

func (h *mailboxFullHook) OnHandled(i pubsub.HandledInfo) {
	if i.Subscriber.Node == h.node && i.Status == pubsub.MailboxFull {
		h.full.Add(1)
	}
}

// TestGroupRetryDoesNotRunARefusedShareAfterPlainPublishes is
// TestGroupRetryDoesNotRunAShareReroutedForAFullMailbox with the member's
// mailbox also refusing ordinary publishes (the node's implicit producer)
// between the producer's first attempt and its retry. Each refused plain
// publish takes a slot of the member's 16 remembered refusals, though a
// plain publish is renumbered per attempt and never comes back with the
// same number: after 16 of them the producer's refused share is forgotten,
// and the retry runs at X what Y already ran (at-most-once topic).
func TestGroupRetryDoesNotRunARefusedShareAfterPlainPublishes(t *testing.T) {
	leakcheck.Parallel(t)
	hook := &mailboxFullHook{}
	c := testcluster.New(t, 3, 3, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(hook), pubsub.WithSilentWaitForTest())...)
	c.WaitConverged(t, 10*time.Second)
	hook.node = c.Nodes[2].ID() // read by OnHandled only once X subscribed below
	topic := ownedBy(t, c.Nodes[1], "refused-ring")
	runs := &memberRuns{ran: map[string][]string{}}
	var xDone atomic.Int64
	release := subscribeHeldMember(t, c, topic, runs, func() { xDone.Add(1) })
	_, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("Y", m)
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	fillMailboxes(t, c, topic, runs, "X")

	// A slow broadcast subscriber at the owner holds the producer's first
	// answer past PublishTimeout; OnPublishError holds the retry until the
	// plain publishes below were refused at X and X drained.
	var slowOnce atomic.Bool
	subscribe(t, c.Nodes[1], topic, func(ctx context.Context, m *pubsub.Message) error {
		if strings.HasPrefix(string(m.Data), "p") && slowOnce.CompareAndSwap(false, true) {
			<-ctx.Done()
		}
		return nil
	})
	polluted := make(chan struct{})
	var pollutedOnce sync.Once
	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute, BatchSize: 2, PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision {
			retries.Add(1)
			<-polluted
			return pubsub.RetryBatch(10 * time.Millisecond)
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close(ctxT(t)) })
	t.Cleanup(func() { pollutedOnce.Do(func() { close(polluted) }) }) // runs first

	futs := []*pubsub.Produced{p.Produce(ctxT(t), []byte("p0")), p.Produce(ctxT(t), []byte("p1"))}
	// BatchSize cuts the batch (Flush would wait for the held retry).
	// Y ran its share and X's, re-routed: X refused its share.
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(runs.of("p0")) > 0 && len(runs.of("p1")) > 0 }, "the first attempt did not run at Y")
	refused := hook.full.Load()
	const plain = 20
	for i := range plain {
		msgs := []pubsub.Outgoing{{Data: []byte(fmt.Sprintf("q%da", i))}, {Data: []byte(fmt.Sprintf("q%db", i))}}
		if _, err := c.Nodes[0].PublishMessages(ctxT(t), topic, msgs, pubsub.WithAck(pubsub.AckAccepted)); err != nil {
			t.Fatal(i, err)
		}
	}
	// One message of each goes to X, whose mailbox is still full.
	testcluster.WaitFor(t, 10*time.Second, func() bool { return hook.full.Load() >= refused+plain }, "X refused %d plain shares, want %d", hook.full.Load()-refused, plain)
	release()
	testcluster.WaitFor(t, 10*time.Second, func() bool { return xDone.Load() >= 2 }, "X did not drain")
	pollutedOnce.Do(func() { close(polluted) })

	for _, f := range futs {
		ack, err := f.Wait(ctxT(t))
		t.Logf("ack %+v err %v", ack, err)
	}
	if retries.Load() == 0 {
		t.Fatal("the batch was never retried: the test did not run what it names")
	}
	for _, m := range []string{"p0", "p1"} {
		if got := runs.of(m); len(got) > 1 {
			t.Errorf("group ran %s %d times at %v; want at most once", m, len(got), got)
		}
	}
}
