package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// AckNone publishes in a loop from a node that does not own the topic are
// merged on the publishing node (outbox.go): every call completes, and
// every message arrives once, in each publishing goroutine's order, also
// when publishes that do not merge (AckDelivered, AckAccepted, a header)
// come between them, and although each caller reuses its bytes as soon as
// a call returned.
func TestAckNoneLoopArrivesInOrder(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "merged")
	const publishers, count = 3, 3000
	var mu sync.Mutex
	got := make([][]int, publishers)
	total := 0
	subscribe(t, c.Nodes[2], topic, func(_ context.Context, m *pubsub.Message) error {
		if string(m.Data) == "end" {
			return nil
		}
		var g, i int
		if _, err := fmt.Sscanf(string(m.Data), "%d-%d", &g, &i); err != nil {
			return err
		}
		mu.Lock()
		got[g] = append(got[g], i)
		total++
		mu.Unlock()
		return nil
	})
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			buf := make([]byte, 0, 32)
			for i := range count {
				buf = fmt.Appendf(buf[:0], "%d-%d", g, i)
				out := []pubsub.Outgoing{{Data: buf}}
				opt := pubsub.WithAck(pubsub.AckNone)
				switch i % 700 {
				case 699:
					opt = pubsub.WithAck(pubsub.AckDelivered)
				case 350:
					opt = pubsub.WithAck(pubsub.AckAccepted)
				case 500:
					out[0].Header = pubsub.Header{"k": {"v"}}
				}
				ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, out, opt)
				if !assert.NoError(t, err, "publisher %d message %d", g, i) {
					return
				}
				assert.Equal(t, 1, ack.Messages)
				if i%700 == 699 {
					assert.Equal(t, 1, ack.Delivered, "the AckDelivered publish is delivered")
				}
			}
		})
	}
	wg.Wait()
	testcluster.WaitFor(t, 20*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return total >= publishers*count },
		"not every message arrived: %d of %d; publisher stats %+v; owner refused %d", func() int { mu.Lock(); defer mu.Unlock(); return total }(), publishers*count,
		c.Nodes[0].Stats().Rejected, c.Nodes[1].Stats().RequestsRefused)
	// A marker from the same node is numbered after every publish above:
	// once it is handled, a duplicate of any of them would have been too.
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("end"))
	require.NoError(t, err)
	require.Equal(t, 1, ack.Delivered)
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, publishers*count, total)
	for g := range publishers {
		for i, n := range got[g] {
			require.Equal(t, i, n, "publisher %d: message %d out of order", g, i)
		}
	}
}

// An AckNone request carries no reply subject, so an owner that refuses it
// cannot tell its publisher: it counts the lost messages
// (Stats.AckNoneRefused) instead of dropping them without a trace. Here a
// node that does not own the topic receives one, as after ownership moved
// under a publisher; the owner accepts the same request and counts nothing.
func TestAckNoneRefusedByAnOwnerIsCounted(t *testing.T) {
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[1], "refused")
	raw := c.Connect(t, 0)
	// In n0's name, as the owner knows it: one from a node it has not heard is refused.
	req := &wire.PublishRequest{From: memberRef(t, c.Nodes[1], c.Nodes[0].ID()), Topic: topic, Count: 3,
		AckLevel: uint32(pubsub.AckNone)}
	data := wire.AppendPublish(nil, req, [][]byte{[]byte("a"), []byte("b"), []byte("c")}, nil)
	require.NoError(t, raw.Publish("pubsub.node."+c.Nodes[0].ID(), data)) // n0 is not the owner
	require.NoError(t, raw.Flush())
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[0].Stats().AckNoneRefused == 3 },
		"AckNoneRefused %d, want the 3 messages", c.Nodes[0].Stats().AckNoneRefused)
	assert.Zero(t, c.Nodes[1].Stats().AckNoneRefused)

	// The owner accepts the same request: nothing counted.
	require.NoError(t, raw.Publish("pubsub.node."+c.Nodes[1].ID(), data))
	require.NoError(t, raw.Flush())
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[1].Stats().MessagesPublished >= 3 },
		"the owner never accepted the request")
	assert.Zero(t, c.Nodes[1].Stats().AckNoneRefused)
}
