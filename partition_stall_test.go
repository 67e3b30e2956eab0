package pubsub_test

// KeepMajority when a graceful leave and an advance make two stable views
// of one epoch from the same view.

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Found in review: 5 nodes, {n0, n2, n4} | {n1, n3}. n0 made the majority's
// view {n0, n2, n4} stable at epoch e+1 while n4 left gracefully, and n2,
// which heard the LEAVE before n0's heartbeat, took n4's hand-over
// {n0, n1, n2, n3} at e+1 instead: two changes of one epoch from one view,
// neither confirmed. Each side of the fork held one live member of its
// view, so neither could adopt the other's (mayReturnTo wants a majority of
// the other view's other members) and the majority stopped serving. With
// n0, the lowest ID, on the 3-member side, nobody served after the heal
// either. Unforced the fork came in 1 run of 15; here, where n0's
// heartbeats are held back while it advances, in every round. A stranded
// node now takes a sibling change when it and the sibling's reporters are
// a majority of both views. One round: the fork is forced in each (three
// ran here until stop 28, 12 s of the suite's time).
func TestKeepMajorityLeaveBesideAnAdvanceConverges(t *testing.T) {
	leakcheck.Parallel(t)
	for round := range 1 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			c := testcluster.NewFaulty(t, 2, 5, keepMajorityOpts()...)
			c.WaitConverged(t, 10*time.Second)
			n := c.Nodes
			waitStableEverywhere(t, n, 5)
			e := n[0].Stats().StableEpoch
			c.Route(0, 1).Cut()
			// Elapsed time is the point: n0's last heartbeat that n2 and n4
			// hear comes a second after n1's and n3's, so they drop those
			// first and keep n0 (and the 5-member view it last reported)
			// while n0, hearing them, makes {n0, n2, n4} stable alone.
			time.Sleep(time.Second)
			c.Client(0).Stall(faultnet.Forward)
			testcluster.WaitFor(t, 3*time.Second, func() bool { return n[0].Stats().StableEpoch == e+1 },
				"n0 never advanced: %s", quorumOf(n))
			require.Equal(t, []string{"n0", "n2", "n4"}, n[0].StableIDsForTest())
			for _, x := range []*pubsub.Node{n[2], n[4]} {
				require.Equal(t, e, x.Stats().StableEpoch, "%s heard n0 advance through the stall: %s", x.ID(), quorumOf(n))
			}
			var wg sync.WaitGroup
			wg.Go(func() { c.AddNode(t, "x1", 1, keepMajorityOpts()...) })
			wg.Go(func() { c.CloseNode(t, 4) })
			testcluster.WaitFor(t, 3*time.Second, func() bool { return n[2].Stats().StableEpoch == e+1 },
				"n2 never took n4's hand-over: %s", quorumOf(n))
			require.Equal(t, []string{"n0", "n1", "n2", "n3"}, n[2].StableIDsForTest())
			c.Client(0).Heal()
			wg.Wait()
			// The minority serves until its failure detectors fire; from
			// then on it must not.
			minority := []*pubsub.Node{n[1], n[3], c.Nodes[5]}
			testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return !serving(minority) }, "the minority serves: %s", quorumOf(minority))
			minorityServed := watchServing(t, minority)
			wg.Go(func() { c.AddNode(t, "x2", 0, keepMajorityOpts()...) })
			wg.Go(func() { c.CloseNode(t, 3) })
			wg.Wait()
			x1, x2 := minority[2], c.Nodes[6]
			majority := []*pubsub.Node{n[0], n[2], x2}
			for _, x := range majority {
				testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return x.Stats().HasQuorum },
					"the majority never served again: %s", stableViewsOf(majority))
			}
			require.Zero(t, minorityServed(), "the minority served: %s", quorumOf(minority))
			live := []*pubsub.Node{n[0], n[1], n[2], x1, x2}
			c.HealAll()
			c.WaitMeshed(t, 10*time.Second)
			c.WaitConverged(t, 3*faultMemberTimeout)
			for _, x := range live {
				testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return x.Stats().HasQuorum },
					"after the heal: %s", stableViewsOf(live))
			}
			waitStableEverywhere(t, live, 5)
		})
	}
}

// watchServing samples, until the returned stop is called (or the test
// ends), whether any node of side serves; stop returns in how many samples
// one did.
func watchServing(t *testing.T, side []*pubsub.Node) (stop func() int) {
	return countSamples(t, func() bool { return serving(side) })
}

// stableViewsOf is quorumOf with each node's stable members and whether
// their change is confirmed.
func stableViewsOf(nodes []*pubsub.Node) string {
	s := ""
	for _, n := range nodes {
		st := n.Stats()
		s += fmt.Sprintf("%s{quorum %v, epoch %d, stable %v, confirmed %v} ", n.ID(), st.HasQuorum, st.StableEpoch, n.StableIDsForTest(), n.StableConfirmedForTest())
	}
	return s
}
