package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// TestWaitMembers: WaitMembers returns once the view holds the count asked
// for (at once when it already does, when a member joins otherwise), and
// says why when it cannot: ctx ended, the node closed, a count below 1.
func TestWaitMembers(t *testing.T) {
	c := newCluster(t, 3, 2)
	n0 := c.Nodes[0]
	require.NoError(t, n0.WaitMembers(ctxT(t), 2), "a view that already holds 2")

	short, cancel := context.WithTimeout(ctxT(t), 50*time.Millisecond)
	defer cancel()
	err := n0.WaitMembers(short, 3)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, err.Error(), "2 of 3 members")

	joined := make(chan error, 1)
	go func() { joined <- n0.WaitMembers(ctxT(t), 3) }()
	c.AddNode(t, "n2", 2)
	select {
	case err := <-joined:
		require.NoError(t, err, "waiting for a third member that joined")
	case <-time.After(10 * time.Second):
		t.Fatal("WaitMembers did not return after a third member joined")
	}
	require.Len(t, n0.Members(), 3)

	require.ErrorIs(t, n0.WaitMembers(ctxT(t), 0), pubsub.ErrInvalidConfig)

	n1 := c.Nodes[1]
	closed := make(chan error, 1)
	go func() { closed <- n1.WaitMembers(ctxT(t), 10) }()
	require.NoError(t, n1.Close(ctxT(t)))
	select {
	case err := <-closed:
		require.ErrorIs(t, err, pubsub.ErrClosed, "waiting on a node that closed")
	case <-time.After(10 * time.Second):
		t.Fatal("WaitMembers did not return after its node closed")
	}
}
