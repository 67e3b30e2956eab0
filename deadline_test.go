package pubsub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
)

// A publish whose caller's deadline ends while the owner still waits for a
// subscriber fails with ReasonTimeout (outcome unknown), and its error
// wraps context.DeadlineExceeded as well as ErrTimeout, whether the owner
// is this node or another: the remote path reported ErrTimeout alone (the
// request's timer, set to the caller's deadline, fires before ctx's own).
func TestPublishPastTheCallersDeadlineWrapsDeadlineExceeded(t *testing.T) {
	c := newCluster(t, 1, 2)
	owner := c.Nodes[0]
	topic := ownedBy(t, owner, "deadline")
	release := make(chan struct{})
	defer close(release)
	subscribe(t, owner, topic, func(ctx context.Context, _ *pubsub.Message) error {
		select { // held until the test ends
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
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
