package pubsub_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// silentMisses publishes to topic on owner for d, calling heal after
// healAt, and counts the publishes accepted while member was in owner's
// view (before and after the call) that sub did not receive and whose ack
// lists no failure.
func silentMisses(t *testing.T, owner *pubsub.Node, topic, member string, sub *pubsub.Subscription, rec *recorder,
	healAt time.Duration, heal func(), d time.Duration) (bad, accepted int) {
	t.Helper()
	healed := make(chan struct{})
	timer := time.AfterFunc(healAt, func() { heal(); close(healed) })
	defer func() {
		if timer.Stop() {
			heal()
		} else {
			<-healed
		}
	}()
	deadline := time.Now().Add(d)
	for i := 0; time.Now().Before(deadline); i++ {
		body := fmt.Sprintf("%s-m-%d", member, i)
		in := hasMember(owner, member)
		ack, err := owner.Publish(ctxT(t), topic, []byte(body))
		if err != nil {
			continue
		}
		accepted++
		in = in && hasMember(owner, member)
		if in && !slices.Contains(rec.of(sub.ID()), body) && len(ack.Failures) == 0 {
			if bad++; bad <= 3 {
				t.Errorf("%s accepted by %s with %s in its view (%v), without %s's subscriber and without a failure: ack %+v",
					body, owner.ID(), member, owner.Members(), member, ack)
			}
		}
	}
	return bad, accepted
}

// waitDelivered waits until a publish on owner reaches sub.
func waitDelivered(t *testing.T, owner *pubsub.Node, topic string, sub *pubsub.Subscription, rec *recorder) {
	t.Helper()
	i := 0
	testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
		i++
		body := fmt.Sprintf("after-%d", i)
		if _, err := owner.Publish(ctxT(t), topic, []byte(body)); err != nil {
			return false
		}
		return slices.Contains(rec.of(sub.ID()), body)
	}, "%s's subscriber never receives from %s after the heal", sub.ID().Node, owner.ID())
}

// A node cut off (n2) owns topic "throughout" its own views. A node that
// restarted on the other side meanwhile (n3, a new incarnation) subscribes
// there, acked by that side's owner. When n2 hears it again, n3 is not a
// "returned" member (view.returned: another incarnation), so n2 serves at
// once, before n3's subscription reaches it by sync. The "returned" case,
// where n3 did not restart, is the one commit 8775369 fixed: n2 waits for
// n3's sync (MemberTimeout at most). n3's receiving side is held until
// 800 ms after n2 hears it, so the sync's round trip (the race window in a
// plain heal) lasts long enough to see.
func TestMemberRestartedAcrossACutIsWaitedFor(t *testing.T) {
	leakcheck.Parallel(t)
	for _, tc := range []struct {
		name    string
		restart bool
	}{{"returned", false}, {"restarted", true}} {
		t.Run(tc.name, func(t *testing.T) {
			c := testcluster.NewFaulty(t, 4, 4, fast...)
			c.WaitConverged(t, 10*time.Second)
			n2 := c.Nodes[2]
			topic := ownedBy(t, n2, "restarted")
			rec := newRecorder()
			subscribe(t, n2, topic, rec.handler)
			if tc.restart {
				c.CloseNode(t, 3)
				c.WaitConverged(t, 10*time.Second)
			}
			// n2's server cut off: cut, not stalled, so n3's JOIN never
			// reaches n2 (a JOIN held by a stall and delivered at the heal
			// makes n3 a plain joiner again).
			isolateServer(c, 2)
			k := 3
			if tc.restart {
				waitViews(t, []*pubsub.Node{c.Nodes[0], c.Nodes[1]}, []*pubsub.Node{n2})
				c.AddNode(t, "n3", 3, fast...)
				k = 4
			} else {
				waitViews(t, []*pubsub.Node{c.Nodes[0], c.Nodes[1], c.Nodes[3]}, []*pubsub.Node{n2})
			}
			n3 := c.Nodes[k]
			var s3 *pubsub.Subscription
			testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool {
				s, err := n3.Subscribe(ctxT(t), topic, rec.handler)
				s3 = s
				return err == nil
			}, "subscribe on n3, on the other side")
			// n2 takes n0 and n1 back first, and serves again.
			c.Route(2, 0).Heal()
			c.Route(2, 1).Heal()
			testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
				return len(n2.Members()) == 3 && hasMember(n2, "n0") && hasMember(n2, "n1")
			}, "n2 sees n0 and n1 again: %v", n2.Members())
			testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
				_, err := n2.Publish(ctxT(t), topic, []byte("probe"))
				return err == nil
			}, "n2 serves again")
			// Then n3: n2 hears it, n3 hears nothing for a while.
			c.Client(k).Stall(faultnet.Backward)
			c.Route(2, 3).Heal() // redialed within about a second
			testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool { return hasMember(n2, "n3") }, "n2 hears n3")
			bad, accepted := silentMisses(t, n2, topic, "n3", s3, rec, 800*time.Millisecond, c.Client(k).Heal, 1200*time.Millisecond)
			waitDelivered(t, n2, topic, s3, rec)
			t.Logf("%d accepted while n3 could not answer, %d silently without its subscriber", accepted, bad)
			assert.Zero(t, bad, "publishes accepted without the subscriber of a member in view")
		})
	}
}
