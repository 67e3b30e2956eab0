package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// A node reuses the Messages of a batch once every handler that saw them
// returned (messageLease). A handler past its deadline still runs, so the
// batch it holds must not be reused while later batches, in the same size
// bucket, go to another subscriber on its node: its *Message keeps its
// topic, data and publisher until it returns. Under -race an early reuse
// is also a reported race between the later batch's build and this read.
func TestHandlerPastItsDeadlineKeepsItsMessage(t *testing.T) {
	t.Run("subscribers", func(t *testing.T) { testHandlerKeepsItsMessage(t, nil) })
	// A member's share that is part of the batch has a lease of its own.
	t.Run("group members", func(t *testing.T) { testHandlerKeepsItsMessage(t, []pubsub.SubscribeOption{pubsub.WithGroup("g")}) })
}

func testHandlerKeepsItsMessage(t *testing.T, opts []pubsub.SubscribeOption) {
	c := newCluster(t, 3, 3, pubsub.WithSubscriberTimeout(200*time.Millisecond), pubsub.WithEvictAfter(1000))
	topic := ownedBy(t, c.Nodes[1], "lease")
	const size, later = 300, 30 // 300 Messages, a member's share 100: pooled sizes

	type snapshot struct {
		m                      *pubsub.Message
		topic, data, publisher string
	}
	held := make(chan snapshot, 1)
	release := make(chan struct{})
	unblock := sync.OnceFunc(func() { close(release) })
	t.Cleanup(unblock) // a failed assertion must not leave the handler, and Close, blocked
	var slowCalls atomic.Int64
	slow, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		if slowCalls.Add(1) == 1 {
			held <- snapshot{m, m.Topic, string(m.Data), m.Publisher}
			<-release // past the 200 ms deadline, while later batches arrive
		}
		return nil
	}, append([]pubsub.SubscribeOption{pubsub.WithSubscriptionMailbox(1)}, opts...)...) // later batches: MailboxFull at once
	require.NoError(t, err)
	var fast atomic.Int64 // the messages the other subscriptions ran
	for _, n := range []*pubsub.Node{c.Nodes[2], c.Nodes[0]} {
		_, err := n.Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error {
			fast.Add(1)
			return nil
		}, opts...)
		require.NoError(t, err)
	}

	batch := func(prefix string) [][]byte {
		b := make([][]byte, size)
		for i := range b {
			b[i] = fmt.Appendf(nil, "%s-%03d", prefix, i)
		}
		return b
	}
	_, err = c.Nodes[0].PublishBatch(ctxT(t), topic, batch("first"))
	require.NoError(t, err)
	var first snapshot
	select {
	case first = <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow handler never ran")
	}
	require.Contains(t, first.data, "first-")
	ran := fast.Load()

	for i := range later {
		ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, batch(fmt.Sprintf("later%02d", i)))
		require.NoError(t, err)
		for _, f := range ack.Failures {
			assert.Equal(t, slow.ID(), f.Subscriber, "only the blocked subscription may miss a batch")
		}
	}
	// Every later batch was built on node 2 and run there by the other
	// subscription (PublishBatch waits for its deliveries).
	assert.GreaterOrEqual(t, fast.Load()-ran, int64(later*size/3), "the later batches did not reach the other subscriptions")

	assert.Equal(t, topic, first.m.Topic)
	assert.Equal(t, first.data, string(first.m.Data), "the blocked handler's Message was reused for a later batch")
	assert.Equal(t, c.Nodes[0].ID(), first.m.Publisher)
	assert.Equal(t, first.publisher, first.m.Publisher)
	unblock()
}
