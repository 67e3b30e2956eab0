package pubsub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A Subscribe (or TopicStats) waiting for a remote owner's answer when its
// own node closes fails because the node closed: the subscription is gone
// whatever the owner did, so its error wraps ErrClosed, as it does when
// Close comes while the request is retried, not the "outcome unknown"
// ErrTimeout of a publish in flight (which Close documents, and which
// stays). Before, the request ended with the rpc layer's
// errClosedInFlight, which wraps only ErrTimeout.
func TestCloseUnderASubscribeInFlightSaysClosed(t *testing.T) {
	c := testcluster.NewFaulty(t, 2, 2, fast...)
	c.WaitConverged(t, 10*time.Second)
	n0 := c.Nodes[0]
	topic := ownedBy(t, c.Nodes[1], "stalled")
	require.NoError(t, n0.Initialize(ctxT(t), topic))
	c.StallRoute(0, 1)
	type res struct {
		what string
		err  error
	}
	out := make(chan res, 3)
	go func() {
		s, err := n0.Subscribe(context.Background(), topic, func(context.Context, *pubsub.Message) error { return nil })
		if s != nil {
			err = errors.New("Subscribe returned a subscription")
		}
		out <- res{"Subscribe", err}
	}()
	go func() {
		_, err := n0.TopicStats(context.Background(), topic)
		out <- res{"TopicStats", err}
	}()
	go func() {
		_, err := n0.Publish(context.Background(), topic, []byte("x"))
		out <- res{"Publish", err}
	}()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return n0.Stats().Subscriptions == 1 }, "Subscribe never registered locally")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lpWithin(t, 15*time.Second, "Close under requests in flight", func() {
		t.Logf("Close: %v", n0.Close(ctx))
		for range 3 {
			r := <-out
			t.Logf("%s: %v", r.what, r.err)
			if r.what == "Publish" {
				assert.ErrorIs(t, r.err, pubsub.ErrTimeout, "a publish in flight has an unknown outcome")
			} else {
				assert.ErrorIs(t, r.err, pubsub.ErrClosed, "%s failed because its node closed", r.what)
			}
		}
	})
	c.HealAll()
}
