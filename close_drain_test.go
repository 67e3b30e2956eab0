package pubsub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// Close promises to end every local subscription with ErrClosed. A
// subscription still behind while its node drains (its owner, here the
// same node, waits SubscriberTimeout for the batch it accepted, then
// evicts it) used to end as evicted, advised to subscribe again on a node
// that was closing.
func TestSubscriptionBehindDuringCloseEndsWithErrClosed(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithSubscriberTimeout(time.Second), pubsub.WithEvictAfter(1))
	n := c.Nodes[0]
	running := make(chan struct{}, 1)
	sub, err := n.Subscribe(ctxT(t), "behind", func(ctx context.Context, _ *pubsub.Message) error {
		select {
		case running <- struct{}{}:
		default:
		}
		<-ctx.Done() // until Close cancels handlers: behind for the whole drain
		return ctx.Err()
	})
	require.NoError(t, err)
	_, err = n.PublishMessages(ctxT(t), "behind", []pubsub.Outgoing{{Data: []byte("a")}, {Data: []byte("b")}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	<-running

	require.NoError(t, n.Close(ctxT(t)))
	require.Equal(t, uint64(1), n.Stats().Evictions, "the owner did not evict the subscription while the node drained: the case was not reached")
	require.Error(t, sub.Err())
	assert.ErrorIs(t, sub.Err(), pubsub.ErrClosed)
	assert.NotErrorIs(t, sub.Err(), pubsub.ErrEvicted)
	assert.Contains(t, sub.Err().Error(), "was behind")
	assert.NotContains(t, sub.Err().Error(), "Subscribe again")
}

// A subscription evicted for its handler's failures while its node drains
// Close ends with ErrClosed too, and the error names the failure: the user
// keeps the sign that the handler was broken.
func TestSubscriptionEvictedForFailuresDuringCloseNamesThem(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithEvictAfter(1))
	n := c.Nodes[0]
	running, fail := make(chan struct{}, 1), make(chan struct{})
	sub, err := n.Subscribe(ctxT(t), "fails", func(ctx context.Context, _ *pubsub.Message) error {
		select {
		case running <- struct{}{}:
		default:
		}
		<-fail
		return errors.New("broken handler")
	})
	require.NoError(t, err)
	_, err = n.PublishMessages(ctxT(t), "fails", []pubsub.Outgoing{{Data: []byte("a")}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	<-running

	// The handler fails only once the node announced its leave: Close has
	// begun, its drain waits for the batch.
	closed := closeUntilItLeaves(t, c, n)
	close(fail)
	require.NoError(t, <-closed)
	require.Equal(t, uint64(1), n.Stats().Evictions, "the owner did not evict the failing subscription while the node drained: the case was not reached")
	assert.ErrorIs(t, sub.Err(), pubsub.ErrClosed)
	assert.Contains(t, sub.Err().Error(), "evicted it for handler-error")
	assert.NotContains(t, sub.Err().Error(), "behind")
}
