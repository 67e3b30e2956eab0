package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// Probe (review of b59c400): a producer made on a node whose Close is
// draining publishes normally: its lifetime is the node's, which ends only
// at shutdown, after the drain.
func TestProducerMadeOnADrainingNodePublishes(t *testing.T) {
	c := newCluster(t, 1, 3)
	a, b, cn := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	held := ownedBy(t, a, "drain-held")
	entered, release := make(chan struct{}, 1), make(chan struct{})
	subscribe(t, b, held, func(ctx context.Context, m *pubsub.Message) error {
		select {
		case entered <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	defer close(release)
	go func() { _, _ = cn.Publish(context.Background(), held, []byte("held")) }()
	<-entered // a's owner side has a batch in flight: its drain waits for it
	left := make(chan struct{}, 1)
	stop := b.Events().Subscribe(func(e pubsub.Event) {
		if l, ok := e.(pubsub.MemberLeft); ok && l.Member.ID == a.ID() {
			select {
			case left <- struct{}{}:
			default:
			}
		}
	})
	defer stop()
	closed := make(chan error, 1)
	go func() { closed <- a.Close(context.Background()) }()
	select {
	case <-left:
	case <-time.After(10 * time.Second):
		t.Fatal("a's LEAVE not seen")
	}
	topic := ownedBy(t, b, "drain-produce")
	got := make(chan struct{}, 1)
	subscribe(t, b, topic, func(context.Context, *pubsub.Message) error { got <- struct{}{}; return nil })
	p, err := pubsub.NewBatchingProducer(a, topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	ack, err := p.Produce(ctxT(t), []byte("during drain")).Wait(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, 1, ack.Delivered)
	select {
	case err := <-closed:
		t.Fatalf("a's Close returned (%v) before the probe ended: not mid-drain", err)
	default:
	}
	release <- struct{}{}
	require.NoError(t, <-closed)
	require.NoError(t, p.Close(ctxT(t)))
}
