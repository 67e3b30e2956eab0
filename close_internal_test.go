package pubsub

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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
	owner, _ := ownerAndPublisher(t, WithSubscriberTimeout(500*time.Millisecond), WithRequestTimeout(time.Second))
	topic := ownedTopics(owner, "owner", "second", 1)[0]
	running, held := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() {
		select {
		case <-held:
		default:
			close(held)
		}
	})
	_, err := owner.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		close(running)
		<-held // ignores its ctx: Close must wait for it
		return nil
	})
	require.NoError(t, err)
	go func() { _, _ = owner.Publish(context.Background(), topic, []byte("held")) }()
	<-running
	first := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		first <- owner.Close(ctx)
	}()
	waitForTest(t, "the first Close stopped the node", owner.life.closed.Load)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err = owner.Close(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded, "a second Close returned before the first finished")
	require.True(t, strings.Contains(err.Error(), "first Close"), err.Error())

	close(held)
	select {
	case err := <-first:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the first Close never returned")
	}
	require.NoError(t, owner.Close(context.Background()), "a Close after the first returned")
}
