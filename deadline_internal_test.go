package pubsub

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

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
