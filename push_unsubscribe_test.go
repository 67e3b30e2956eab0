package pubsub_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A node pushes its subscriptions of a topic whose owner moved to the new
// owner (pushMoved). It built the push, then wrote it a moment later: an
// Unsubscribe in between sent its request first, the new owner read the
// push second and added the subscriber back, and the next publish's ack
// listed a subscriber that had left cleanly as SubscriberGone. The push is
// now written before any Unsubscribe of a subscriber it names can send its
// request.
func TestPushedSyncIsNotOvertakenByAnUnsubscribe(t *testing.T) {
	var (
		armed      atomic.Bool
		leaving    atomic.Pointer[pubsub.Subscription]
		newOwner   atomic.Pointer[pubsub.Node]
		movedTopic atomic.Pointer[string]
		served     atomic.Bool // the new owner served the topic before the Unsubscribe
	)
	unsubscribed, written := make(chan error, 1), make(chan struct{})
	hook := func(wrote bool) {
		if wrote {
			if armed.Load() {
				armed.Store(false)
				close(written)
			}
			return
		}
		if !armed.Load() {
			return
		}
		// The new owner must serve the topic already (the leaver's handover
		// taken), or it holds the request and the push for its registry,
		// where the later of the two wins.
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			ack, err := newOwner.Load().Publish(ctx, *movedTopic.Load(), []byte("ready?"))
			cancel()
			if err == nil && ack.Delivered == 2 {
				served.Store(true)
				break
			}
		}
		// Unsubscribe between the push's snapshot and its write. Fixed, it
		// waits for the write, so this waits in vain and the push goes
		// first; broken, it returns once the new owner took the request.
		done := make(chan error, 1)
		go func() { done <- leaving.Load().Unsubscribe(context.Background()) }()
		select {
		case err := <-done:
			unsubscribed <- err
		case <-time.After(500 * time.Millisecond):
			go func() { unsubscribed <- <-done }()
		}
	}
	c := testcluster.New(t, 3, 0)
	c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithPushHookForTest(hook))...)
	c.AddNode(t, "n1", 1, fast...)
	newOwner.Store(c.AddNode(t, "n2", 2, fast...))
	c.WaitConverged(t, 10*time.Second)
	var topic string
	for i := 0; topic == ""; i++ {
		cand := fmt.Sprintf("pushed-%d", i)
		if pubsub.OwnerForTest(cand, []string{"n0", "n1", "n2"}) == "n1" && pubsub.OwnerForTest(cand, []string{"n0", "n2"}) == "n2" {
			topic = cand
		}
	}
	movedTopic.Store(&topic)
	subscribe(t, c.Nodes[0], topic, newRecorder().handler)
	leaving.Store(subscribe(t, c.Nodes[0], topic, newRecorder().handler))
	ack, err := c.Nodes[2].Publish(ctxT(t), topic, []byte("before"))
	mustAccept(t, ack, err, 2)

	armed.Store(true)
	c.CloseNode(t, 1) // the topic moves to n2: n0 pushes both subscriptions there
	select {
	case <-written:
	case <-time.After(15 * time.Second):
		t.Fatal("the push was never written")
	}
	select {
	case err := <-unsubscribed:
		require.NoError(t, err)
	case <-time.After(15 * time.Second):
		t.Fatal("Unsubscribe never returned")
	}
	require.True(t, served.Load(), "the new owner never served the topic before the Unsubscribe: the race was not set up")
	// A subscribe from n0 leaves after the push on the same connection,
	// so its answer says the new owner has read the push.
	subscribe(t, c.Nodes[0], topic, newRecorder().handler)
	ack, err = c.Nodes[2].Publish(ctxT(t), topic, []byte("after"))
	require.NoError(t, err)
	assert.Equal(t, 2, ack.Delivered, "ack %+v", ack)
	assert.Empty(t, ack.Failures, "the new owner held the unsubscribed subscriber: the push overtook its Unsubscribe")
}
