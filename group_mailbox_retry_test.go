package pubsub_test

import (
	"context"
	"sync"
	"testing"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A group member whose mailbox was full in a producer batch's first
// attempt has its share re-routed, and the other member runs it. The
// attempt's outcome is unknown to the producer (a slow broadcast
// subscriber holds the owner's answer past PublishTimeout), and its retry
// through the same owner is assigned as the first attempt was: the member,
// whose mailbox has drained meanwhile, must not run the share the other
// member already ran (at-most-once topic).
func TestGroupRetryDoesNotRunAShareReroutedForAFullMailbox(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3, pubsub.WithSilentWaitForTest())
	topic := ownedBy(t, c.Nodes[1], "mailbox-retry")
	runs := &memberRuns{ran: map[string][]string{}}
	release := subscribeHeldMember(t, c, topic, runs, nil)
	_, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("Y", m)
		if string(m.Data) != "fill" {
			// X's share re-routed here: X may drain now, before the retry.
			release()
		}
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	fillMailboxes(t, c, topic, runs, "X")
	p, retries := retriedProducer(t, c, topic)
	// Round robin: one message to each member; the one given to X is
	// re-routed to Y.
	futs := []*pubsub.Produced{p.Produce(ctxT(t), []byte("p0")), p.Produce(ctxT(t), []byte("p1"))}
	if err := p.Flush(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	var ack pubsub.PublishAck
	for _, f := range futs {
		ack, err = f.Wait(ctxT(t))
	}
	t.Logf("ack %+v err %v; retries %d; ran p0 %v p1 %v", ack, err, retries.Load(), runs.of("p0"), runs.of("p1"))
	if retries.Load() == 0 {
		t.Fatal("the batch was never retried: the test did not run what it names")
	}
	for _, m := range []string{"p0", "p1"} {
		if got := runs.of(m); len(got) > 1 {
			t.Errorf("group ran %s %d times at %v; want at most once", m, len(got), got)
		}
	}
}

// subscribeHeldMember subscribes X, a member of topic's group g on node 2
// with a mailbox of one batch: its handler records each message in runs and
// holds each "fill" until release is called (at the test's cleanup at the
// latest), then calls released if not nil.
func subscribeHeldMember(t *testing.T, c *testcluster.Cluster, topic string, runs *memberRuns, released func()) (release func()) {
	t.Helper()
	held := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release) // before the cluster's own cleanup, registered earlier
	_, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("X", m)
		if string(m.Data) == "fill" {
			<-held
			if released != nil {
				released()
			}
		}
		return nil
	}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	if err != nil {
		t.Fatal(err)
	}
	return release
}
