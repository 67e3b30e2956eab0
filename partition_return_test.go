package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Under KeepMajority the minority's owner stops serving, and the majority
// takes its topics over; a subscription made there during the cut is
// acked by the majority's owner. When the cut heals, the old owner takes
// the topic back: it must not accept a publish while a member in its view
// has subscriptions it has not heard of yet. It did (Delivered 2 of 3, no
// failure listed, for 1 to 35 publishes, 2 of 12 runs): the topic, owned
// "throughout" by the returning node, kept serving while the returned
// members' syncs were on their way (topicActor.reconcile, view.returned).
func TestKeepMajorityReturningOwnerServesOnlyWithEverySubscriber(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, keepMajorityOpts()...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[2], "back")
	rec := newRecorder()
	subscribe(t, c.Nodes[2], topic, rec.handler)
	isolateServer(c, 2)
	testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
		return !c.Nodes[2].Stats().HasQuorum && len(c.Nodes[0].Members()) == 2 && c.Nodes[0].Stats().HasQuorum &&
			len(c.Nodes[1].Members()) == 2 && c.Nodes[1].Stats().HasQuorum
	}, "n2 keeps its quorum or the majority does not form")
	// Acked by the majority's owner of the topic.
	subs := map[int]*pubsub.Subscription{}
	for _, k := range []int{0, 1} {
		testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool {
			s, err := c.Nodes[k].Subscribe(ctxT(t), topic, rec.handler)
			subs[k] = s
			return err == nil
		}, "subscribe on the majority side")
	}
	c.HealAll()
	deadline := time.Now().Add(2 * faultMemberTimeout)
	bad, accepted, missed := 0, 0, 0
	servedAll := false
	for i := 0; time.Now().Before(deadline); i++ {
		inView := map[int]bool{0: hasMember(c.Nodes[2], c.Nodes[0].ID()), 1: hasMember(c.Nodes[2], c.Nodes[1].ID())}
		body := fmt.Sprintf("m-%d", i)
		ack, err := c.Nodes[2].Publish(ctxT(t), topic, []byte(body))
		if err != nil {
			continue
		}
		// In view before and after the publish: in view at acceptance.
		inView[0] = inView[0] && hasMember(c.Nodes[2], c.Nodes[0].ID())
		inView[1] = inView[1] && hasMember(c.Nodes[2], c.Nodes[1].ID())
		accepted++
		for k, s := range subs {
			got := false
			for _, b := range rec.of(s.ID()) {
				if b == body {
					got = true
				}
			}
			if !got {
				missed++
			}
			if inView[k] && !got && len(ack.Failures) == 0 {
				bad++
				if bad <= 3 {
					t.Errorf("%s accepted by n2 with n%d in its view (%v) without n%d's subscriber and without a failure: ack %+v", body, k, c.Nodes[2].Members(), k, ack)
				}
			}
		}
		servedAll = servedAll || ack.Delivered == 3
		if accepted > 200 && servedAll {
			break
		}
	}
	assert.Zero(t, bad, "publishes accepted without a known subscriber of a member in view")
	assert.True(t, servedAll, "n2 never served all three subscribers within 2 x MemberTimeout of the heal (%d publishes accepted)", accepted)
	t.Logf("%d accepted, %d misses of a majority-side subscriber (%d silently with its node in n2's view)", accepted, missed, bad)
}
