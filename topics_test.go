package pubsub_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

func noop(context.Context, *pubsub.Message) error { return nil }

func TestTopicsListsEveryTopicWithItsSubscribersAcrossNodes(t *testing.T) {
	c := newCluster(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	ctx := ctxT(t)
	subscribe(t, c.Nodes[0], "orders", noop)
	subscribe(t, c.Nodes[0], "orders", noop)
	subscribe(t, c.Nodes[2], "orders", noop)
	for _, i := range []int{1, 2} {
		_, err := c.Nodes[i].Subscribe(ctx, "jobs", noop, pubsub.WithGroup("workers"))
		require.NoError(t, err)
	}
	subscribe(t, c.Nodes[0], "jobs", noop)
	gone := subscribe(t, c.Nodes[1], "gone", noop)
	require.NoError(t, gone.Unsubscribe(ctx))

	for _, asker := range c.Nodes {
		got, err := asker.Topics(ctx)
		require.NoError(t, err, "asked of %s", asker.ID())
		ordersOwner, err := asker.OwnerOf("orders")
		require.NoError(t, err)
		jobsOwner, err := asker.OwnerOf("jobs")
		require.NoError(t, err)
		assert.Equal(t, []pubsub.TopicInfo{
			{Topic: "jobs", Owner: jobsOwner.ID, Subscribers: 3, Groups: map[string]int{"workers": 2}},
			{Topic: "orders", Owner: ordersOwner.ID, Subscribers: 3},
		}, got, "asked of %s", asker.ID())
	}
}

// A member whose connection died is still in the view until MemberTimeout:
// Topics returns the others' topics and an error naming it.
func TestTopicsReportsMembersThatDoNotAnswer(t *testing.T) {
	c := newCluster(t, 1, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	subscribe(t, c.Nodes[1], "kept", noop)
	subscribe(t, c.Nodes[2], "lost", noop)
	c.Crash(2)
	got, err := c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTimeout)
	assert.Contains(t, err.Error(), "member n2")
	assert.Contains(t, err.Error(), "1 of 3 members did not answer")
	require.Len(t, got, 1)
	assert.Equal(t, "kept", got[0].Topic)

	require.NoError(t, c.Nodes[0].Close(ctxT(t)))
	_, err = c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrClosed)
}

// A member with more topics than fit one NATS message answers in pages.
func TestTopicsPagesThroughMaxPayload(t *testing.T) {
	srv, err := embedded.StartServerWith(func(o *server.Options) { o.MaxPayload = 4096 })
	require.NoError(t, err)
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	var nodes []*pubsub.Node
	for i := range 2 {
		nc, err := nats.Connect(srv.ClientURL())
		require.NoError(t, err)
		defer nc.Close()
		n, err := pubsub.Join(ctxT(t), nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID(fmt.Sprintf("p%d", i)))...)
		require.NoError(t, err)
		defer n.Close(context.Background())
		nodes = append(nodes, n)
	}
	const topics = 400 // about 40 bytes each: 16 kB, four pages or more
	for i := range topics {
		subscribe(t, nodes[1], fmt.Sprintf("a-topic-with-a-rather-long-name-%04d", i), noop)
	}
	got, err := nodes[0].Topics(ctxT(t))
	require.NoError(t, err)
	require.Len(t, got, topics)
	for i, ti := range got {
		assert.Equal(t, fmt.Sprintf("a-topic-with-a-rather-long-name-%04d", i), ti.Topic)
		assert.Equal(t, 1, ti.Subscribers)
	}
}
