package pubsub_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Every node tracks stable views now, whatever its policy (87190d3); a
// cluster all on KeepServing must act as before: s, cut off alone (it sees
// 1 of 3, no majority of its stable view), keeps serving, reports
// HasQuorum and no stable epoch, and no node emits QuorumChanged or logs
// about the partition policy, neither then nor when s later leaves
// gracefully.
func TestKeepServingClusterIgnoresItsStableViews(t *testing.T) {
	leakcheck.Parallel(t)
	logs := &syncBuffer{}
	c := heteroNodes(t, testcluster.NewFaulty(t, 3, 0), [3][]pubsub.Option{{warnLogger(logs)}, {warnLogger(logs)}, {warnLogger(logs)}})
	p, o, s := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	var quorumEvents atomic.Int64
	for _, n := range c.Nodes {
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if _, ok := e.(pubsub.QuorumChanged); ok {
				quorumEvents.Add(1)
			}
		})
		t.Cleanup(cancel)
	}
	topic := topicOwnedByEveryView(t, c, "o")
	subscribe(t, s, topic, newRecorder().handler)
	isolateServer(c, 2)
	waitViews(t, []*pubsub.Node{p, o}, []*pubsub.Node{s})
	ack, err := s.Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1) // s owns the topic on its side, its own subscriber
	for _, n := range c.Nodes {
		st := n.Stats()
		require.True(t, st.HasQuorum, "%s", n.ID())
		require.Zero(t, st.StableEpoch, "%s", n.ID())
		require.Zero(t, st.StableMembers, "%s", n.ID())
	}
	c.HealAll()
	c.WaitMeshed(t, 10*time.Second)
	c.WaitConverged(t, 3*faultMemberTimeout)
	require.NoError(t, s.Close(ctxT(t)))
	waitViews(t, []*pubsub.Node{p, o})
	require.Zero(t, quorumEvents.Load(), "a KeepServing node emitted QuorumChanged")
	require.NotContains(t, logs.String(), "partition policy:", "a KeepServing node logged about stable views")
}
