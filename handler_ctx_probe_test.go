package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
)

// Probe: the subscribers of one batch on one node share its ctx, and a
// handler that returns when that ctx has ended is reported Timeout. The
// ctx must end only at the deadline (or the node's Close): a fast
// subscriber of the same batch finishing first must not end it for a slow
// one still within its deadline, which would then be reported Timeout
// (and its handler cut short). Owner remote and local.
func TestSlowSubscriberBesideAFastOneKeepsItsCtx(t *testing.T) {
	c := newCluster(t, 1, 2)
	for _, owner := range []int{0, 1} {
		topic := ownedBy(t, c.Nodes[owner], "slow-beside-fast")
		t.Run(topic, func(t *testing.T) {
			n1 := c.Nodes[1]
			ended := make(chan error, 1)
			subscribe(t, n1, topic, func(ctx context.Context, _ *pubsub.Message) error {
				select {
				case <-ctx.Done():
				case <-time.After(150 * time.Millisecond): // well within SubscriberTimeout (2 s)
				}
				ended <- ctx.Err()
				return nil
			})
			subscribe(t, n1, topic, func(context.Context, *pubsub.Message) error { return nil })
			ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
			mustAccept(t, ack, err, 2)
			assert.NoError(t, <-ended, "the slow handler's ctx ended before its deadline")
		})
	}
}
