package pubsub

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A first Close whose ctx ends while a handler still runs returns an
// error; a second Close must not then return nil at once while the
// handler (a goroutine of the node) still runs.
func TestSecondCloseAfterAFailedFirstWaitsForHandlers(t *testing.T) {
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
		<-held
		return nil
	})
	require.NoError(t, err)
	go func() { _, _ = owner.Publish(context.Background(), topic, []byte("held")) }()
	<-running
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	require.Error(t, owner.Close(ctx), "first Close")
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	err = owner.Close(ctx2)
	require.Error(t, err, "second Close returned nil while the handler still runs")
}

// The publisher's own Close fails a remote publish in flight with
// errClosedInFlight; its caller's ctx still had seconds left, so its error
// must not claim context.DeadlineExceeded.
func TestClosedInFlightIsNotTheCallersDeadline(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithSubscriberTimeout(5*time.Second), WithRequestTimeout(5*time.Second))
	topic := ownedTopics(pub, "owner", "dl", 1)[0]
	holdDeliveries(t, owner, topic)
	waitForTest(t, "subscription", func() bool { _, err := owner.TopicStats(t.Context(), topic); return err == nil })
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		_, err := pub.Publish(ctx, topic, []byte("x"))
		done <- err
	}()
	waitForTest(t, "in flight", func() bool { return owner.owner.inflight.Load() == 1 })
	cctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_ = pub.Close(cctx)
	err := <-done
	require.ErrorIs(t, err, ErrTimeout)
	require.False(t, errors.Is(err, context.DeadlineExceeded), "err %v claims the caller's deadline ran out", err)
}
