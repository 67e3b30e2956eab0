package pubsub_test

// KeepMajority as members come and go without a fault: joiners, graceful
// leaves (the leaver hands on a stable view), restarts under old IDs.

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Members crashed and restarted under their IDs count for the majority
// again: the survivor alone holds no majority of {n0, n1, n2}, and the
// restarted nodes, which know no stable view, learn the survivor's.
func TestKeepMajorityRestartedMembersRestoreTheMajority(t *testing.T) {
	c := newCluster(t, 1, 3, pubsub.WithPartitionPolicy(pubsub.KeepMajority))
	survivor := c.Nodes[2]
	events := watch(t, survivor)
	c.Crash(0)
	c.Crash(1)
	testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return len(survivor.Members()) == 1 && !survivor.Stats().HasQuorum },
		"the survivor of 3 still serves: %s", quorumOf([]*pubsub.Node{survivor}))
	topic := ownedBy(t, survivor, "restart")
	_, err := survivor.Publish(ctxT(t), topic, []byte("alone"))
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	// So with a deadline shorter than RequestTimeout: not published, not
	// "outcome unknown".
	short, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	ack, err := survivor.Publish(short, topic, []byte("alone, in a hurry"))
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
	lost := find(t, events, func(e pubsub.QuorumChanged) bool { return !e.HasQuorum })
	assert.Equal(t, "n2", lost.Node)
	assert.Equal(t, []int{1, 3}, []int{lost.Members, lost.Stable}, "members seen, of the stable view")

	for _, id := range []string{"n0", "n1"} {
		c.AddNode(t, id, 0, append(append([]pubsub.Option{}, fast...), pubsub.WithPartitionPolicy(pubsub.KeepMajority))...)
	}
	c.WaitConverged(t, 3*faultMemberTimeout)
	for _, n := range c.Nodes[2:] {
		testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return n.Stats().HasQuorum },
			"after the restarts: %s", quorumOf(c.Nodes[2:]))
	}
	publishUntilAccepted(t, c.Nodes[3], topic, []byte("back"), 0, 2*faultMemberTimeout)
	find(t, events, func(e pubsub.QuorumChanged) bool { return e.HasQuorum })
}

// A node joining a running KeepMajority cluster adopts its stable view from
// the heartbeats it hears while joining, so it serves the topics it takes
// over as soon as Join returns, and the cluster makes the view with it
// stable.
func TestKeepMajorityJoinerServesWhenJoinReturns(t *testing.T) {
	c := newCluster(t, 1, 3, pubsub.WithPartitionPolicy(pubsub.KeepMajority))
	for _, n := range c.Nodes {
		testcluster.WaitFor(t, 2*time.Second, func() bool { return n.Stats().StableEpoch > 0 },
			"the cluster never agreed a stable view: %s", quorumOf(c.Nodes))
	}
	for i, id := range []string{"n3", "n4"} {
		joiner := c.AddNode(t, id, 0, append(append([]pubsub.Option{}, fast...), pubsub.WithPartitionPolicy(pubsub.KeepMajority))...)
		require.True(t, joiner.Stats().HasQuorum, "%s joined without a majority: %s", id, quorumOf(c.Nodes))
		ack, err := joiner.Publish(ctxT(t), ownedBy(t, joiner, fmt.Sprintf("joined-%d", i)), []byte("x"))
		require.NoError(t, err)
		assert.Equal(t, 0, ack.Delivered)
	}
	for _, n := range c.Nodes {
		testcluster.WaitFor(t, 2*time.Second, func() bool { st := n.Stats(); return st.HasQuorum && st.StableMembers == 5 },
			"the view with the joiners never became stable: %s", quorumOf(c.Nodes))
	}
}

// Found in review: a rolling replacement (two of five crash, two new nodes
// join before the crashed ones time out) left every node but the first to
// move without a majority.
func TestKeepMajorityRollingReplacementKeepsTheMajority(t *testing.T) {
	c := newCluster(t, 1, 5, pubsub.WithPartitionPolicy(pubsub.KeepMajority))
	waitStableEverywhere(t, c.Nodes, 5)
	c.Crash(0)
	c.Crash(1)
	for _, id := range []string{"a5", "a6"} {
		c.AddNode(t, id, 0, append(append([]pubsub.Option{}, fast...), pubsub.WithPartitionPolicy(pubsub.KeepMajority))...)
	}
	c.WaitConverged(t, 3*faultMemberTimeout)
	waitStableEverywhere(t, c.Nodes[2:], 5)
}

// A join and a graceful leave within milliseconds of each other, as in a
// rolling restart: the members took the leave's stable view at once
// (forgetLeaver) and counted the peers still reporting the one before as
// catching up, but only while their current view was the stable one. The
// joiner made it differ, so until the peers' next heartbeats (deferred up
// to earlyBeatSpacing by the join's early one) they counted nobody and
// lost their majority: QuorumChanged false, then true, publishes to their
// topics rejected meanwhile.
func TestKeepMajorityGracefulLeaveRightAfterAJoinKeepsTheMajority(t *testing.T) {
	for round := range 3 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			c := newCluster(t, 1, 4, keepMajorityOpts()...)
			waitStableEverywhere(t, c.Nodes, 4)
			stayers := c.Nodes[:3]
			lost := countQuorumLosses(t, stayers)
			admitted := make(chan struct{})
			var once sync.Once
			cancel := c.Nodes[0].Events().Subscribe(func(e pubsub.Event) {
				if m, ok := e.(pubsub.MemberJoined); ok && m.Member.ID == "j" {
					once.Do(func() { close(admitted) })
				}
			})
			defer cancel()
			closed := make(chan struct{})
			go func() {
				defer close(closed)
				<-admitted
				c.CloseNode(t, 3)
			}()
			j := c.AddNode(t, "j", 0, keepMajorityOpts()...)
			<-closed
			waitStableEverywhere(t, append(slices.Clone(stayers), j), 4)
			assert.Zero(t, lost.Load(), "members lost their majority over a join and a leave: %s", quorumOf(stayers))
		})
	}
}

// Found by a randomized probe: re-partitions and the tie rule left n0 alone
// as the whole stable view {n0}; the others adopted it after the heal, and
// n0 left gracefully. Each dropped n0 from {n0}: an empty stable view, and
// the next count panicked in the NATS callback, killing the process. A
// leaver that holds a majority now hands on a view in its LEAVE (its view
// without it, when its stable view without it has nobody in sight).
func TestKeepMajorityLeaverOfAOneMemberStableViewHandsOn(t *testing.T) {
	c, n := fourOfFiveStable(t)
	cutSides(c, []int{2, 4}, []int{0, 1}) // {n0, n1}: half of it, with its lowest ID
	c.Route(2, 3).Heal()
	c.Route(3, 4).Heal()
	waitViews(t, []*pubsub.Node{n[0], n[1]}, []*pubsub.Node{n[2], n[3], n[4]})
	waitStableEverywhere(t, []*pubsub.Node{n[0], n[1]}, 2)
	waitConfirmed(t, n[0], n[1])
	c.Route(0, 1).Cut() // {n0} alone: half of {n0, n1}, with its lowest ID
	for _, s := range []int{2, 3, 4} {
		c.Route(1, s).Heal()
	}
	waitViews(t, []*pubsub.Node{n[0]}, []*pubsub.Node{n[1], n[2], n[3], n[4]})
	testcluster.WaitFor(t, 2*time.Second, func() bool { return n[0].Stats().StableMembers == 1 }, "n0 never made {n0} stable: %s", quorumOf(n))
	waitConfirmed(t, n[0])
	c.HealAll()
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		for _, x := range n[1:] {
			if st := x.Stats(); st.HasQuorum && st.StableMembers == 1 {
				return true
			}
		}
		return false
	}, "nobody adopted {n0}: %s", quorumOf(n))
	c.CloseNode(t, 0)
	c.WaitMeshed(t, 10*time.Second)
	c.WaitConverged(t, 3*faultMemberTimeout)
	waitStableEverywhere(t, n[1:], 4)
}

// Found by a randomized probe: the lone half of a two-member stable view
// that wins the tie crossed a partition, and the nodes there adopted its
// view; it then left gracefully. They dropped it into a view of the other
// member alone, whom none of them could see, and that member never heard
// the LEAVE: after a full heal no node served again. The leaver now hands
// on its view without it.
func TestKeepMajorityTieBreakerLeavingHandsOn(t *testing.T) {
	c, n := fourOfFiveStable(t)
	cutSides(c, []int{1, 4}, []int{0, 2}) // {n0, n2}: half, with the lowest ID
	c.Route(1, 3).Heal()
	c.Route(3, 4).Heal()
	waitViews(t, []*pubsub.Node{n[0], n[2]}, []*pubsub.Node{n[1], n[3], n[4]})
	waitStableEverywhere(t, []*pubsub.Node{n[0], n[2]}, 2)
	waitConfirmed(t, n[0], n[2])
	cutSides(c, []int{0}, []int{2}) // n0 crosses: {n2} | {n0, n1, n3, n4}
	for _, s := range []int{1, 3, 4} {
		c.Route(0, s).Heal()
	}
	// n0 leaves once the side it crossed to took its stable view from it
	// (the probe's case). Leaving before that is the limit INTERNALS names.
	testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
		return slices.Equal(n[1].StableIDsForTest(), []string{"n0", "n2"}) && slices.Equal(n[3].StableIDsForTest(), []string{"n0", "n2"}) &&
			slices.Equal(n[4].StableIDsForTest(), []string{"n0", "n2"})
	}, "the side n0 crossed to never took its stable view: %s", quorumOf(n))
	c.CloseNode(t, 0)
	c.HealAll()
	c.WaitMeshed(t, 10*time.Second)
	c.WaitConverged(t, 3*faultMemberTimeout)
	waitStableEverywhere(t, n[1:], 4)
}

// A member that leaves gracefully before any stable view held it has
// nothing to hand on: the others' stable view must stay as it was, not
// move to the next epoch with the same members. A client-only joiner
// serves from the stable view it adopted at Join, without itself, until
// the next advance takes it in; full joiners are in it when Join returns.
func TestKeepMajorityLeaverNeverInTheStableViewLeavesItAlone(t *testing.T) {
	// Heartbeats a second apart: a stable view advances on a tick, so the
	// joiner's leave, right after its Join, comes before the advance.
	opts := append(keepMajorityOpts(), pubsub.WithHeartbeatInterval(time.Second), pubsub.WithMemberTimeout(4*time.Second))
	c := newCluster(t, 1, 3, opts...)
	waitStableEverywhere(t, c.Nodes, 3)
	exercised := 0
	for round := 0; exercised < 2 && round < 12; round++ {
		before := c.Nodes[0].Stats().StableEpoch
		id := fmt.Sprintf("j%d", round)
		j := c.AddNode(t, id, 0, append(opts, pubsub.WithClientOnly())...)
		require.Equal(t, j, c.Nodes[len(c.Nodes)-1])
		inStable := slices.Contains(c.Nodes[0].StableIDsForTest(), id)
		c.CloseNode(t, len(c.Nodes)-1)
		waitStableEverywhere(t, c.Nodes[:3], 3)
		if inStable {
			continue // the advance took it in: its leave moves the view on
		}
		exercised++
		// Advanced to a view with the joiner after the check, then without
		// it at its leave: two epochs. Never one, with the same members.
		assert.NotEqual(t, before+1, c.Nodes[0].Stats().StableEpoch, "round %d: the stable view moved on for a leaver it never held", round)
	}
	require.NotZero(t, exercised, "every joiner was in the stable view before it left: nothing tested")
}
