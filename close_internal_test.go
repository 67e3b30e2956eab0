package pubsub

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// A Close whose ctx ends while it drains (a batch it accepted as owner is
// still held by a subscriber) says so: it used to return nil once its own
// goroutines had ended, as if the drain had finished, or blamed the
// handlers.
func TestCloseCutShortWhileDrainingSaysSo(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(3*time.Second), WithSubscriberTimeout(2*time.Second))
	topic := ownedTopics(pub, "owner", "cut", 1)[0]
	release := holdDeliveries(t, pub, topic)
	published := make(chan error, 1)
	go func() {
		_, err := pub.Publish(context.Background(), topic, []byte("held"))
		published <- err
	}()
	waitForTest(t, "the batch in flight at the owner", func() bool { return owner.owner.inflight.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := owner.Close(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, err.Error(), "draining")
	release()
	select {
	case <-published: // answered or not, the publish ends
	case <-time.After(10 * time.Second):
		t.Fatal("the publish never returned")
	}
}

// A second Close while the first still waits for a handler waits too
// (within its own ctx): it returned nil at once, so a caller could restart
// the node's ID while the first Close was still running.
func TestSecondCloseWaitsForTheFirst(t *testing.T) {
	owner := ownerRunningAHeldHandler(t)
	first := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		first <- owner.Close(ctx)
	}()
	waitForTest(t, "the first Close stopped the node", owner.life.closed.Load)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := owner.Close(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded, "a second Close returned before the first finished")
	require.True(t, strings.Contains(err.Error(), "first Close"), err.Error())

	owner.held()
	select {
	case err := <-first:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the first Close never returned")
	}
	require.NoError(t, owner.Close(context.Background()), "a Close after the first returned")
}

// heldOwner is a node whose own subscriber's handler is running and
// ignores its ctx until held is called (or the test ends).
type heldOwner struct {
	*Node
	held func()
}

// ownerRunningAHeldHandler returns the owner of an ownerAndPublisher pair
// (short subscriber and request timeouts) with a handler running on a topic
// it owns: Close must wait for it.
func ownerRunningAHeldHandler(t *testing.T) heldOwner {
	owner, _ := ownerAndPublisher(t, WithSubscriberTimeout(500*time.Millisecond), WithRequestTimeout(time.Second))
	topic := ownedTopics(owner, "owner", "held", 1)[0]
	running, release := make(chan struct{}), make(chan struct{})
	held := sync.OnceFunc(func() { close(release) })
	t.Cleanup(held)
	_, err := owner.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		close(running)
		<-release // ignores its ctx
		return nil
	})
	require.NoError(t, err)
	go func() { _, _ = owner.Publish(context.Background(), topic, []byte("held")) }()
	<-running
	return heldOwner{owner, held}
}

// A first Close whose ctx ends while a handler still runs returns an
// error; a second Close must not then return nil at once while the
// handler (a goroutine of the node) still runs (found in review).
func TestSecondCloseAfterAFailedFirstWaitsForHandlers(t *testing.T) {
	leakcheck.Parallel(t)
	owner := ownerRunningAHeldHandler(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	require.Error(t, owner.Close(ctx), "first Close")
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	require.Error(t, owner.Close(ctx2), "second Close returned nil while the handler still runs")
	owner.held()
	require.NoError(t, owner.Close(t.Context()), "a Close once the handler returned")
}
