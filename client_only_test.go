package pubsub_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// Client-only nodes publish and subscribe through the others and never own
// a topic: across 200 topics, in every node's view.
func TestClientOnlyNodesNeverOwn(t *testing.T) {
	c := newCluster(t, 3, 2)
	edge := c.AddNode(t, "edge-a", 2, append(fast, pubsub.WithClientOnly())...)
	tool := c.AddNode(t, "edge-b", 1, append(fast, pubsub.WithClientOnly())...)
	c.WaitConverged(t, 10*time.Second)
	for _, m := range edge.Members() {
		assert.Equal(t, m.ID == "edge-a" || m.ID == "edge-b", m.ClientOnly, "member %s", m.ID)
	}
	rec := newRecorder()
	for i := range 200 {
		topic := fmt.Sprintf("edge-topic-%d", i)
		for _, n := range c.Nodes {
			owner, err := n.OwnerOf(topic)
			require.NoError(t, err)
			require.False(t, owner.ClientOnly, "%s: %s owns %s", n.ID(), owner.ID, topic)
		}
		if i%20 == 0 { // a few round trips between the two client nodes
			subscribe(t, tool, topic, rec.handler)
			ack, err := edge.Publish(ctxT(t), topic, []byte(topic))
			mustAccept(t, ack, err, 1)
		}
	}
	assert.Equal(t, 10, rec.total())
	for _, n := range []*pubsub.Node{edge, tool} {
		assert.Zero(t, n.Stats().TopicsOwned, "%s owns nothing", n.ID())
	}
	// The owners' topics move among the owner-eligible nodes only: when one
	// leaves, the other owns everything.
	c.CloseNode(t, 0)
	c.WaitConverged(t, 10*time.Second, c.Live()...)
	for i := range 200 {
		owner, err := edge.OwnerOf(fmt.Sprintf("edge-topic-%d", i))
		require.NoError(t, err)
		require.Equal(t, c.Nodes[1].ID(), owner.ID)
	}
}

// A cluster of client-only nodes has no owner: publishes, subscribes and
// OwnerOf fail with ErrTopicUnavailable.
func TestOnlyClientNodesHaveNoOwner(t *testing.T) {
	c := newCluster(t, 3, 2, pubsub.WithClientOnly(), pubsub.WithRequestTimeout(300*time.Millisecond))
	_, err := c.Nodes[0].OwnerOf("t")
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	assert.Contains(t, err.Error(), "client-only")
	ack, err := c.Nodes[0].Publish(ctxT(t), "t", []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
	assert.Contains(t, err.Error(), "client-only")
	_, err = c.Nodes[1].Subscribe(ctxT(t), "t", newRecorder().handler)
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)

	// A call whose deadline comes before RequestTimeout published nothing
	// either: ReasonTopicUnavailable, not ReasonTimeout (outcome unknown),
	// and errors.Is still finds the deadline.
	short, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	ack, err = c.Nodes[0].Publish(short, "t", []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
	assert.Contains(t, err.Error(), "client-only")

	// An owner-eligible node joining serves at once.
	owner := c.AddNode(t, "server-node", 0, fast...)
	c.WaitConverged(t, 10*time.Second)
	rec := newRecorder()
	subscribe(t, c.Nodes[1], "t", rec.handler)
	ack, err = c.Nodes[0].Publish(ctxT(t), "t", []byte("x"))
	mustAccept(t, ack, err, 1)
	m, err := c.Nodes[0].OwnerOf("t")
	require.NoError(t, err)
	assert.Equal(t, owner.ID(), m.ID)
}
