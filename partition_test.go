package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// keepMajorityOpts is fast with KeepMajority and a 250 ms heartbeat: views
// converge within milliseconds of a change (early heartbeats), and a stable
// view used to move only at the next tick, so a fault right after the views
// converge lands before it.
func keepMajorityOpts() []pubsub.Option {
	return append(append([]pubsub.Option{}, fast...),
		pubsub.WithHeartbeatInterval(250*time.Millisecond),
		pubsub.WithPartitionPolicy(pubsub.KeepMajority))
}

// isolateServer cuts every route of server s.
func isolateServer(c *testcluster.Cluster, s int) {
	for o := range len(c.Servers.Servers) {
		if o != s {
			c.Route(s, o).Cut()
		}
	}
}

// waitViews waits until every node of each side sees exactly its side.
func waitViews(t *testing.T, sides ...[]*pubsub.Node) {
	t.Helper()
	for _, side := range sides {
		for _, n := range side {
			testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return len(n.Members()) == len(side) },
				"%s sees %v, want its side of %d", n.ID(), n.Members(), len(side))
		}
	}
}

// serving reports whether any node of side serves as owner.
func serving(side []*pubsub.Node) bool {
	for _, n := range side {
		if n.Stats().HasQuorum {
			return true
		}
	}
	return false
}

// requireNeverBothSidesServe watches a two-sided partition for d: the two
// sides must never serve at once, and a side that serves must accept a
// publish while the other rejects it with ErrTopicUnavailable.
func requireNeverBothSidesServe(t *testing.T, a, b []*pubsub.Node, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		sa, sb := serving(a), serving(b)
		require.False(t, sa && sb, "both sides of the partition serve: %s and %s", quorumOf(a), quorumOf(b))
		time.Sleep(10 * time.Millisecond) // sampling, not synchronisation: the property must hold throughout
	}
	for _, side := range [][]*pubsub.Node{a, b} {
		topic := ownedBy(t, side[0], "split")
		ack, err := side[0].Publish(ctxT(t), topic, []byte("x"))
		if serving(side) {
			require.NoError(t, err, "the serving side %s", quorumOf(side))
			continue
		}
		require.ErrorIs(t, err, pubsub.ErrTopicUnavailable, "the side without a majority accepted: %s", quorumOf(side))
		assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
	}
}

func quorumOf(side []*pubsub.Node) string {
	s := ""
	for _, n := range side {
		st := n.Stats()
		s += fmt.Sprintf("%s{quorum %v, stable epoch %d of %d members} ", n.ID(), st.HasQuorum, st.StableEpoch, st.StableMembers)
	}
	return s
}

// healAndServe heals every fault and waits until every node serves, then
// checks every node's topics deliver to every subscriber.
func healAndServe(t *testing.T, c *testcluster.Cluster) {
	t.Helper()
	c.HealAll()
	c.WaitMeshed(t, 10*time.Second)
	c.WaitConverged(t, 3*faultMemberTimeout)
	for _, n := range c.Nodes {
		testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return n.Stats().HasQuorum },
			"after the heal: %s", quorumOf(c.Nodes))
	}
	rec := newRecorder()
	var topics []string
	for i, n := range c.Nodes {
		topics = append(topics, ownedBy(t, n, fmt.Sprintf("healed-%d", i)))
	}
	for _, n := range c.Nodes {
		for _, topic := range topics {
			subscribe(t, n, topic, rec.handler)
		}
	}
	for i, topic := range topics {
		publishUntilAccepted(t, c.Nodes[(i+1)%len(c.Nodes)], topic, []byte("healed"), len(c.Nodes), 2*faultMemberTimeout)
	}
}

// Regression (fault probe): under KeepMajority each node adopted its stable
// view by itself, so right after a heal the nodes that had been cut off
// still held the older, larger stable view, and counted the others against
// it. A second partition right then gave both sides a majority of their own
// stable views, and both served every topic. Stable views are now agreed:
// a node counts a member only while it reports the same stable view.
func TestKeepMajorityRepartitionRightAfterAHealServesOneSide(t *testing.T) {
	t.Run("tie", func(t *testing.T) {
		// {n0} | {n1, n2}; heal; at once {n1} | {n0, n2}. n1 wins the
		// tie of its stable view {n1, n2}; n0 counted 2 of its {n0, n1, n2}.
		c := testcluster.NewFaulty(t, 3, 3, keepMajorityOpts()...)
		c.WaitConverged(t, 10*time.Second)
		n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
		isolateServer(c, 0)
		waitViews(t, []*pubsub.Node{n0}, []*pubsub.Node{n1, n2})
		for _, n := range []*pubsub.Node{n1, n2} {
			testcluster.WaitFor(t, 2*time.Second, func() bool { return n.Stats().StableMembers == 2 },
				"the majority never made its view stable: %s", quorumOf(c.Nodes))
		}
		require.False(t, n0.Stats().HasQuorum, "the isolated node serves")
		c.HealAll()
		c.WaitMeshed(t, 10*time.Second)
		c.WaitConverged(t, 3*faultMemberTimeout)
		isolateServer(c, 1)
		a, b := []*pubsub.Node{n1}, []*pubsub.Node{n0, n2}
		waitViews(t, a, b)
		requireNeverBothSidesServe(t, a, b, 2*time.Second)
		healAndServe(t, c)
	})
	t.Run("five nodes", func(t *testing.T) {
		// Servers hold {n0, n3}, {n1, n4}, {n2}. {n0, n3} | {n1, n2, n4};
		// heal; at once {n1, n4} | {n0, n2, n3}. n1 and n4 count 2 of their
		// stable {n1, n2, n4}; n0 and n3 counted 3 of their {n0, ..., n4}.
		c := testcluster.NewFaulty(t, 3, 5, keepMajorityOpts()...)
		c.WaitConverged(t, 10*time.Second)
		n := c.Nodes
		isolateServer(c, 0)
		waitViews(t, []*pubsub.Node{n[0], n[3]}, []*pubsub.Node{n[1], n[2], n[4]})
		for _, i := range []int{1, 2, 4} {
			testcluster.WaitFor(t, 2*time.Second, func() bool { return n[i].Stats().StableMembers == 3 },
				"the majority never made its view stable: %s", quorumOf(n))
		}
		c.HealAll()
		c.WaitMeshed(t, 10*time.Second)
		c.WaitConverged(t, 3*faultMemberTimeout)
		isolateServer(c, 1)
		a, b := []*pubsub.Node{n[1], n[4]}, []*pubsub.Node{n[0], n[2], n[3]}
		waitViews(t, a, b)
		requireNeverBothSidesServe(t, a, b, 2*time.Second)
		healAndServe(t, c)
	})
}

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
