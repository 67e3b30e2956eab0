package pubsub_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// blockingHandler runs until release is closed, counting its calls and
// saying on entered when the first began.
type blockingHandler struct {
	calls   atomic.Int64
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

// newBlockingHandler returns a blocked handler that the test's cleanup
// releases if the test has not (a failed assertion must not leave a
// handler, and so the cluster's Close, blocked).
func newBlockingHandler(t *testing.T) *blockingHandler {
	b := &blockingHandler{entered: make(chan struct{}), release: make(chan struct{})}
	t.Cleanup(b.unblock)
	return b
}

func (b *blockingHandler) unblock() { b.once.Do(func() { close(b.release) }) }

func (b *blockingHandler) handle(context.Context, *pubsub.Message) error {
	if b.calls.Add(1) == 1 {
		close(b.entered)
	}
	<-b.release
	return nil
}

// publishThree publishes a batch of three messages to topic at
// AckAccepted, so that it returns while the handler runs.
func publishThree(t *testing.T, n *pubsub.Node, topic string) {
	t.Helper()
	msgs := []pubsub.Outgoing{{Data: []byte("a")}, {Data: []byte("b")}, {Data: []byte("c")}}
	ack, err := n.PublishMessages(ctxT(t), topic, msgs, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	require.Equal(t, pubsub.Accepted, ack.Status)
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// Unsubscribe returns without waiting for a handler call already running
// (the handler may be the caller); Stopped closes once that call returns,
// and no call starts after it: the batch's other messages never run.
func TestStoppedClosesOnceTheRunningHandlerReturns(t *testing.T) {
	c := newCluster(t, 2, 2)
	topic := ownedBy(t, c.Nodes[1], "stopped")
	h := newBlockingHandler(t)
	s, err := c.Nodes[0].Subscribe(ctxT(t), topic, h.handle)
	require.NoError(t, err)
	assert.False(t, isClosed(s.Stopped()), "Stopped closed on a live subscription")
	publishThree(t, c.Nodes[1], topic)
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never ran")
	}
	require.NoError(t, s.Unsubscribe(ctxT(t)))
	require.True(t, isClosed(s.Done()), "Done is closed when Unsubscribe returns")
	assert.False(t, isClosed(s.Stopped()), "Stopped closed while the handler still runs")
	h.unblock()
	testcluster.WaitFor(t, 10*time.Second, func() bool { return isClosed(s.Stopped()) }, "Stopped never closed after the handler returned")
	assert.Equal(t, int64(1), h.calls.Load(), "a call started after the end")
}

// A handler that unsubscribes its own subscription returns before Stopped
// closes; Stopped closes after it. An idle subscription's Stopped closes
// at its end, by Unsubscribe or by its node's Close.
func TestStoppedAfterEveryEnd(t *testing.T) {
	c := newCluster(t, 2, 2)
	topic := ownedBy(t, c.Nodes[1], "stopped-self")
	var self atomic.Pointer[pubsub.Subscription]
	var openInHandler atomic.Bool
	ran := make(chan struct{})
	s, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(ctx context.Context, _ *pubsub.Message) error {
		sub := self.Load()
		if sub == nil {
			return nil
		}
		if err := sub.Unsubscribe(ctx); err != nil {
			return err
		}
		openInHandler.Store(!isClosed(sub.Stopped()))
		close(ran)
		return nil
	})
	require.NoError(t, err)
	self.Store(s)
	publishThree(t, c.Nodes[1], topic)
	select {
	case <-ran:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never unsubscribed")
	}
	assert.True(t, openInHandler.Load(), "Stopped closed while its own handler still ran")
	testcluster.WaitFor(t, 10*time.Second, func() bool { return isClosed(s.Stopped()) }, "Stopped never closed after the handler unsubscribed itself")

	idle, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error { return nil })
	require.NoError(t, err)
	require.NoError(t, idle.Unsubscribe(ctxT(t)))
	testcluster.WaitFor(t, 5*time.Second, func() bool { return isClosed(idle.Stopped()) }, "Stopped never closed after Unsubscribe")

	closing, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error { return nil })
	require.NoError(t, err)
	c.CloseNode(t, 0)
	require.ErrorIs(t, closing.Err(), pubsub.ErrClosed)
	assert.True(t, isClosed(closing.Stopped()), "Stopped still open after the node's Close returned")
}
