package pubsub_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
)

// A publish whose owner does not answer by the caller's deadline fails
// with ReasonTimeout (outcome unknown), and its error wraps
// context.DeadlineExceeded as well as ErrTimeout, whether the owner is this
// node or another: the remote path reported ErrTimeout alone (the
// request's timer, set to the caller's deadline, fires before ctx's own).
// A slow subscriber no longer does it (the owner answers at the deadline,
// TestPublishAnsweredAtItsDeadlineListsWhoRan): here the owner's actor for
// the topic is held, by a DeliveryMode function that blocks.
func TestPublishPastTheCallersDeadlineWrapsDeadlineExceeded(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	var held atomic.Bool
	c := newCluster(t, 1, 2, pubsub.WithDeliveryMode(func(topic string) pubsub.DeliveryMode {
		if held.Load() && strings.HasPrefix(topic, "deadline") {
			<-release
		}
		return pubsub.AtMostOnce
	}))
	owner := c.Nodes[0]
	topic := ownedBy(t, owner, "deadline")
	subscribe(t, owner, topic, func(context.Context, *pubsub.Message) error { return nil })
	held.Store(true)
	for name, publisher := range map[string]*pubsub.Node{"remote owner": c.Nodes[1], "local owner": owner} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			ack, err := publisher.Publish(ctx, topic, []byte("held"))
			assert.Equal(t, pubsub.ReasonTimeout, ack.Reason)
			assert.True(t, errors.Is(err, context.DeadlineExceeded), "err %v does not wrap context.DeadlineExceeded", err)
			assert.ErrorIs(t, err, pubsub.ErrTimeout)
		})
	}
}
