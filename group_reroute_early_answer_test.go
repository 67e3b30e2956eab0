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

// Consumer-group shares re-routed while their publisher is answered at its
// deadline (answer_by.go with reroute.go): the owner ("o", server 1) waits
// longer than the publisher ("p", server 0), so it answers early with what
// it knows, and a re-route planned before or after that answer reports
// later, into the batch's final outcome (events, stats).

// shortOwner gives the owner's timeouts: a share out on a stalled route
// times out (at least once: is given up on) within a second, so a re-route
// comes soon after the publisher's deadline.
var shortOwner = []pubsub.Option{pubsub.WithSubscriberTimeout(600 * time.Millisecond), pubsub.WithRequestTimeout(800 * time.Millisecond)}

// earlyPublish publishes two messages, one per member of a two-member
// group, from node 0 with a deadline within, and checks the answer came
// before it.
func earlyPublish(t *testing.T, c *testcluster.Cluster, topic string, within time.Duration, data ...string) pubsub.PublishAck {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctxT(t), within)
	defer cancel()
	deadline, _ := ctx.Deadline()
	out := make([]pubsub.Outgoing, len(data))
	for i, d := range data {
		out[i] = pubsub.Outgoing{Data: []byte(d)}
	}
	ack, err := c.Nodes[0].PublishMessages(ctx, topic, out)
	require.NoError(t, err, "the owner answers before the deadline")
	require.True(t, time.Now().Before(deadline), "answered after the deadline")
	require.Equal(t, pubsub.Accepted, ack.Status)
	return ack
}

// assertGroupFailedOnce checks ack counts group g as not delivered and
// lists each of its members at most once, each with g.
func assertGroupFailedOnce(t *testing.T, ack pubsub.PublishAck, g string) {
	t.Helper()
	assert.Zero(t, ack.Delivered, "the group counted Delivered with a share unrun: %+v", ack)
	require.NotEmpty(t, ack.Failures, "%+v", ack)
	seen := map[pubsub.SubscriberID]bool{}
	for _, f := range ack.Failures {
		assert.False(t, seen[f.Subscriber], "member listed twice: %+v", ack)
		seen[f.Subscriber] = true
		assert.Equal(t, g, f.Group, "%+v", ack)
		assert.Equal(t, pubsub.Timeout, f.Status, "%+v", ack)
	}
}

// TestEarlyAnswerWithAGroupShareReroutedFromAStalledRoute: the route
// between the owner and the node of one group member stalls one way (the
// share held, or the member's report of it); that member's share times
// out, and on an at-least-once topic is re-routed to the member on the
// owner's node, after the publisher's (500 ms) deadline. The publisher is answered before it, the stalled
// member Timeout and the group not Delivered; the batch's final outcome
// counts the group Delivered once (at least once: the re-route ran it) or
// the member failed once (at most once). After the heal, with the
// publisher re-publishing a batch whose group was not delivered, no
// message was lost (at least once) or run twice (at most once).
func TestEarlyAnswerWithAGroupShareReroutedFromAStalledRoute(t *testing.T) {
	for _, tc := range []struct {
		name string
		alo  bool
		// stall: servers {from, to}; from node s's server to the owner's,
		// the member runs its share and its report is held
		stall [2]int
	}{
		{"at least once, owner to member", true, [2]int{1, 2}},
		{"at most once, owner to member", false, [2]int{1, 2}},
		{"at least once, member to owner", true, [2]int{2, 1}},
		{"at most once, member to owner", false, [2]int{2, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mode []pubsub.Option
			if tc.alo {
				mode = []pubsub.Option{pubsub.WithDeliveryMode(atLeastOnce)}
			}
			c := faultyHetero(t, [3][]pubsub.Option{mode, append(append([]pubsub.Option{}, mode...), shortOwner...), mode})
			topic := topicOwnedByEveryView(t, c, "o")
			owner := c.Nodes[1]
			runs := &memberRuns{ran: map[string][]string{}}
			for i, name := range map[int]string{1: "near", 2: "far"} {
				_, err := c.Nodes[i].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
					runs.record(name, m)
					return nil
				}, pubsub.WithGroup("g"))
				require.NoError(t, err)
			}
			// Each member has its share of a batch: the group is placed.
			// Round robin gives the next the same way: far's is "a" or "b".
			mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "w0", "w1"), nil, 1)
			farMsg := "b"
			if runs.of("w0")[0] == "far" {
				farMsg = "a"
			}
			before := owner.Stats()

			c.StallRoute(tc.stall[0], tc.stall[1])
			ack := earlyPublish(t, c, topic, 500*time.Millisecond, "a", "b")
			assertGroupFailedOnce(t, ack, "g")
			require.Len(t, ack.Failures, 1, "only the stalled member is waited for: %+v", ack)
			assert.Equal(t, "s", ack.Failures[0].Subscriber.Node)
			// The batch's final outcome, the re-route's included, counts it once.
			testcluster.WaitFor(t, 5*time.Second, func() bool {
				st := owner.Stats()
				return st.Deliveries+st.DeliveryFailures > before.Deliveries+before.DeliveryFailures
			}, "the batch never settled")
			ran := runs.of(farMsg) // far's run, if it got the share, and the re-route's
			if tc.alo {
				assert.Contains(t, ran, "near", "not re-routed to the near member")
			} else {
				assert.NotContains(t, ran, "near", "at most once: a Timeout is not re-routed")
			}
			c.HealAll()
			st := owner.Stats()
			assert.Equal(t, before.AnsweredEarly+1, st.AnsweredEarly)
			if tc.alo {
				assert.Equal(t, before.Deliveries+1, st.Deliveries, "the re-route ran the share: the group Delivered once")
				assert.Equal(t, before.DeliveryFailures, st.DeliveryFailures)
				// Not delivered by the answer: the publisher sends it again.
				mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "a", "b"), nil, 1)
			} else {
				assert.Equal(t, before.Deliveries, st.Deliveries)
				assert.Equal(t, before.DeliveryFailures+1, st.DeliveryFailures, "the stalled member failed once")
			}
			// Behind the stalled delivery on the healed route: once it is
			// answered, node s has had the stalled batch.
			mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "z0", "z1"), nil, 1)
			for _, m := range []string{"a", "b"} {
				got := runs.of(m)
				if tc.alo {
					assert.NotEmpty(t, got, "%s lost", m)
				} else {
					assert.LessOrEqual(t, len(got), 1, "%s ran twice: %v", m, got)
				}
			}
			assert.Zero(t, owner.Stats().Evictions)
		})
	}
}

// TestEarlyAnswerWithEveryGroupMemberStalled: both members of the group
// are on server 2 and the route from the owner's server to it stalls, on
// an at-least-once topic: each share times out, one is re-routed to the
// other member, whose node does not answer either. The publisher, whose
// deadline comes before any re-route (500 ms) or while one is out
// (1.1 s), is answered before it with the group failed, each member
// listed at most once; the batch's outcome counts one failure.
func TestEarlyAnswerWithEveryGroupMemberStalled(t *testing.T) {
	for _, within := range []time.Duration{500 * time.Millisecond, 1100 * time.Millisecond} {
		t.Run(within.String(), func(t *testing.T) {
			alo := []pubsub.Option{pubsub.WithDeliveryMode(atLeastOnce)}
			c := faultyHetero(t, [3][]pubsub.Option{alo, append(append([]pubsub.Option{}, alo...), shortOwner...), alo})
			c.AddNode(t, "s2", 2, append(append([]pubsub.Option{}, fast...), alo...)...)
			c.WaitConverged(t, 10*time.Second)
			topic := topicOwnedByEveryView(t, c, "o")
			owner := c.Nodes[1]
			rec := newRecorder()
			for _, i := range []int{2, 3} {
				_, err := c.Nodes[i].Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
				require.NoError(t, err)
			}
			mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "w0", "w1"), nil, 1)
			before := owner.Stats()

			c.StallRoute(1, 2)
			ack := earlyPublish(t, c, topic, within, "a", "b")
			t.Logf("ack %+v", ack)
			assertGroupFailedOnce(t, ack, "g")
			testcluster.WaitFor(t, 5*time.Second, func() bool {
				st := owner.Stats()
				return st.Deliveries+st.DeliveryFailures > before.Deliveries+before.DeliveryFailures
			}, "the batch never settled")
			c.HealAll()
			st := owner.Stats()
			assert.Equal(t, before.AnsweredEarly+1, st.AnsweredEarly)
			assert.Equal(t, before.Deliveries, st.Deliveries, "no member ran the group's shares")
			assert.Equal(t, before.DeliveryFailures+1, st.DeliveryFailures, "the group failed once")
			mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "z0", "z1"), nil, 1)
			assert.Zero(t, owner.Stats().Evictions)
		})
	}
}

// TestEarlyAnswerThenAMemberLeavesMidShare: a group member on node "s"
// blocks in the first message of its share; the publisher (500 ms) is
// answered with it Timeout. The member then unsubscribes: its node
// reports the share partly run, and the rest is re-routed to the member
// on the owner's node, after the answer. Nothing is answered twice, the
// batch's outcome is counted once (the group Delivered), and each message
// ran once in the group (at most once).
func TestEarlyAnswerThenAMemberLeavesMidShare(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{nil, nil, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	owner := c.Nodes[1]
	runs := &memberRuns{ran: map[string][]string{}}
	_, err := owner.Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("near", m)
		return nil
	}, pubsub.WithGroup("g"))
	require.NoError(t, err)
	started, release := make(chan struct{}, 1), make(chan struct{})
	far, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		runs.record("far", m)
		if string(m.Data) == "b" {
			started <- struct{}{}
			select { // until it unsubscribed
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}, pubsub.WithGroup("g"))
	require.NoError(t, err)
	mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "w0", "w1"), nil, 1)
	require.Equal(t, []string{"far"}, runs.of("w1"), "round robin gives the far member every second message")
	accepted := make(chan pubsub.PublishAccepted, 16)
	t.Cleanup(owner.Events().Subscribe(func(e pubsub.Event) {
		if a, ok := e.(pubsub.PublishAccepted); ok && a.Messages == 4 {
			accepted <- a
		}
	}))
	before := owner.Stats()

	ack := earlyPublish(t, c, topic, 500*time.Millisecond, "a", "b", "c", "d")
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: far.ID(), Status: pubsub.Timeout, Group: "g"}}, ack.Failures)
	assert.Zero(t, ack.Delivered)
	select {
	case <-started:
	default:
		t.Fatal("the far member was not running its share at the answer")
	}
	require.NoError(t, far.Unsubscribe(ctxT(t)))
	close(release)
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		return owner.Stats().Deliveries > before.Deliveries
	}, "the rest of the share was never re-routed and run")
	mustAccept(t, earlyPublish(t, c, topic, 5*time.Second, "z"), nil, 1)
	st := owner.Stats()
	assert.Equal(t, before.AnsweredEarly+1, st.AnsweredEarly)
	assert.Equal(t, before.Deliveries+2, st.Deliveries, "the batch and the next each counted the group once")
	assert.Equal(t, before.DeliveryFailures, st.DeliveryFailures)
	for m, want := range map[string][]string{"a": {"near"}, "b": {"far"}, "c": {"near"}, "d": {"near"}} {
		assert.Equal(t, want, runs.of(m), "message %s", m)
	}
	select {
	case a := <-accepted:
		assert.Equal(t, [2]int{1, 0}, [2]int{a.Delivered, a.Failed}, "the group Delivered, nobody failed: %+v", a)
	case <-time.After(5 * time.Second):
		t.Fatal("the batch's outcome was never emitted")
	}
	assert.Empty(t, accepted, "the batch's outcome emitted twice")
}
