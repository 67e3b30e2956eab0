package pubsub

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
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

// TestOwnersSubscriberTimeoutOnTheWireIsNotShorter: the subscriber's node
// runs a batch within the shorter of its own SubscriberTimeout and the one
// the owner sends in whole milliseconds. Truncated, a SubscriberTimeout
// that is not a whole number of milliseconds came back shorter, so in a
// cluster where every node has the same one, remote subscribers were cut
// off (and reported Timeout) before the owner's local ones.
func TestOwnersSubscriberTimeoutOnTheWireIsNotShorter(t *testing.T) {
	for _, d := range []time.Duration{time.Nanosecond, 500 * time.Microsecond, 1500 * time.Microsecond, time.Millisecond, 5 * time.Second, 2500*time.Millisecond + 1} {
		ms := time.Duration(timeoutMillis(d)) * time.Millisecond
		assert.GreaterOrEqual(t, ms, d, "%v sent as %v", d, ms)
		assert.Less(t, ms, d+time.Millisecond, "%v sent as %v", d, ms)
	}
	assert.Equal(t, uint32(math.MaxUint32), timeoutMillis(time.Duration(math.MaxInt64)))
}
