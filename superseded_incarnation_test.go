package pubsub_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A node cut off (its connection stalled both ways) past MemberTimeout is
// dropped; a replacement joins under its ID meanwhile; then the stall
// heals. Peers keep the newer incarnation and ignore the older one's
// heartbeats, while the older one keeps running, taking every request on
// the ID's inbox subject. Guarantee 9: every live subscription receives
// again, or has ended with an error saying why.
func TestSupersededNodesSubscriptionReceivesOrEnds(t *testing.T) {
	t.Skip("open (5 of 5 runs fail): the older incarnation never learns that its peers replaced it; it keeps its subscriptions, which no owner knows any more, without ending them. Fix needs the older node to step down on seeing it was replaced, in a way a forged newer heartbeat cannot trigger (TestForgedNewerIncarnationOfALiveMemberIsIgnored)")
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "superseded-sub")
	rec := newRecorder()
	older := c.Nodes[2]
	sz := subscribe(t, older, topic, rec.handler)
	c.Client(2).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	c.HealAll()
	healed := time.Now()
	var last pubsub.PublishAck
	ok := pollUntil(2*2*time.Second, func() bool {
		select {
		case <-sz.Done():
			return true
		default:
		}
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("after"))
		last = ack
		return err == nil && len(rec.of(sz.ID())) > 0
	})
	require.True(t, ok, "the older's subscription %v neither received nor ended within 2 x MemberTimeout of the heal (last ack %+v); older view %v, peers' %v, replacement's %v",
		sz.ID(), last, older.Members(), c.Nodes[0].Members(), n2.Members())
	t.Logf("after %v: ended %v (%v), received %d", time.Since(healed), sz.Err() != nil, sz.Err(), len(rec.of(sz.ID())))
}

// pollUntil polls cond every 10 ms until it holds (true) or d passed (false).
func pollUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
	return true
}

// The replacement's subscriptions after the heal: deliveries to the ID's
// inbox subject reach the older incarnation too, which answered
// SubscriberGone for subscribers it does not have; when its answer came
// first the owner dropped the replacement's live subscription, and later
// publishes were acked Delivered 0 with no failure while it lived.
func TestSupersededNodeDoesNotAnswerForItsReplacement(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "superseded-repl")
	c.Client(2).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	c.HealAll()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(c.Nodes[2].Members()) == 3 }, "older did not hear its peers again")
	rec := newRecorder()
	s := subscribe(t, n2, topic, rec.handler)
	bad := 0
	for i := range 50 {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		if err != nil || ack.Delivered != 1 || len(ack.Failures) != 0 {
			bad++
			if bad <= 3 {
				t.Errorf("publish %d: ack %+v, err %v", i, ack, err)
			}
		}
	}
	t.Logf("replacement's subscription ran %d of 50; ended: %v", len(rec.of(s.ID())), s.Err())
	require.Zero(t, bad)
}
