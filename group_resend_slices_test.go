package pubsub_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Regression: a group member's node is sent its subset of a batch the
// owner's own publisher published. Once a node with plain subscribers was
// sent the whole batch (packing it), the subset was re-packed from the
// publisher's slices at every at-least-once re-send, after its publish had
// returned (ctx ended) and it could reuse them: a re-send carried other
// bytes than the first copy under the same seq.
func TestGroupSubsetResendDoesNotRereadPublisherSlices(t *testing.T) {
	c := newCluster(t, 1, 5, pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return pubsub.AtLeastOnce }))
	o, b := c.Nodes[0], c.Nodes[4]
	topic := ownedBy(t, o, "resend")
	for _, n := range c.Nodes[1:4] { // plain subscribers: their nodes get the whole batch, packed
		subscribe(t, n, topic, func(context.Context, *pubsub.Message) error { return nil })
	}
	release := make(chan struct{})
	defer close(release)
	slow := func(ctx context.Context, _ *pubsub.Message) error { // no report before a re-send
		select {
		case <-release:
		case <-time.After(700 * time.Millisecond):
		}
		return nil
	}
	_, err := b.Subscribe(ctxT(t), topic, slow, pubsub.WithGroup("g"))
	require.NoError(t, err)
	// The owner's own member gets its share after the remote sends: once
	// it has, the first copies are written.
	sent := make(chan struct{}, 64)
	_, err = o.Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error { sent <- struct{}{}; return nil }, pubsub.WithGroup("g"))
	require.NoError(t, err)

	var inbox string
	for _, m := range o.Members() {
		if m.ID == b.ID() {
			inbox = m.Inbox
		}
	}
	require.NotEmpty(t, inbox)
	spy := c.Connect(t, 0)
	var mu sync.Mutex
	copies := map[uint64][]string{} // seq -> packed messages of each copy b was sent
	_, err = spy.Subscribe(inbox, func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) != nil || env.GetDeliver() == nil || env.GetDeliver().GetTopic() != topic {
			return
		}
		d := env.GetDeliver()
		mu.Lock()
		copies[d.GetSeq()] = append(copies[d.GetSeq()], string(d.GetPacked()))
		mu.Unlock()
	})
	require.NoError(t, err)
	require.NoError(t, spy.Flush())

	for i := 0; i < 8; i++ {
		batch := [][]byte{[]byte("first-message"), []byte("second-message")}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		_, _ = o.PublishBatch(ctx, topic, batch)
		cancel()
		select {
		case <-sent:
		case <-time.After(10 * time.Second):
			t.Fatalf("batch %d: the owner's own member got no share", i)
		}
		// The publish returned: the publisher reuses its slices.
		for _, m := range batch {
			for k := range m {
				m[k] = 'X'
			}
		}
	}
	// Every batch is re-sent: b reports each after its member's 700 ms,
	// the owner asks again every SubscriberTimeout/4.
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, cs := range copies {
			if len(cs) < 2 {
				return false
			}
		}
		return len(copies) == 8
	}, "every batch re-sent to b")
	mu.Lock()
	defer mu.Unlock()
	for seq, cs := range copies {
		for _, c := range cs[1:] {
			require.Equal(t, cs[0], c, "batch %d: a re-send to b carried other bytes than its first copy", seq)
		}
	}
}
