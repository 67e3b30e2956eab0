package pubsub_test

import (
	"context"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// unbufferedPair joins two nodes on one server: linked's connection goes
// through a faultnet link and buffers nothing while it reconnects
// (nats.ReconnectBufSize(-1)), other's connects directly.
func unbufferedPair(t *testing.T, opts ...pubsub.Option) (link *faultnet.Link, linkedNC *nats.Conn, linked, other *pubsub.Node) {
	t.Helper()
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	u, err := url.Parse(s.ClientURL())
	require.NoError(t, err)
	link, err = faultnet.Listen(u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { _ = link.Close() })

	opts = append(append([]pubsub.Option{}, fast...), opts...)
	join := func(id string, nc *nats.Conn) *pubsub.Node {
		t.Cleanup(nc.Close)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n, err := pubsub.Join(ctx, nc, append(opts, pubsub.WithNodeID(id))...)
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = n.Close(ctx)
		})
		return n
	}
	linkedNC, err = nats.Connect("nats://"+link.Addr(), nats.ReconnectBufSize(-1), nats.MaxReconnects(-1),
		nats.ReconnectWait(20*time.Millisecond), nats.IgnoreDiscoveredServers(), nats.NoCallbacksAfterClientClose())
	require.NoError(t, err)
	linked = join("linked", linkedNC)
	otherNC, err := nats.Connect(s.ClientURL(), nats.NoCallbacksAfterClientClose())
	require.NoError(t, err)
	other = join("other", otherNC)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(linked.Members()) == 2 && len(other.Members()) == 2 }, "views")
	return link, linkedNC, linked, other
}

// Regression: an owner whose connection is reconnecting and buffers
// nothing more (nats.ReconnectBufSize reached, or -1: no buffering) fails
// its deliveries' writes with nats.ErrReconnectBufExceeded. Nothing was
// sent, yet on an AtLeastOnce topic the delivery was not retried: it was
// reported Timeout and the message was lost once the connection was back
// a moment later, within the subscriber timeout.
func TestAtLeastOnceRetriesADeliveryTheReconnectingConnectionRefused(t *testing.T) {
	link, ownerNC, owner, subNode := unbufferedPair(t, pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return pubsub.AtLeastOnce }))
	topic := ownedBy(t, owner, "alo-reconnect")
	var got atomic.Int64
	subscribe(t, subNode, topic, func(context.Context, *pubsub.Message) error { got.Add(1); return nil })

	link.Cut()
	testcluster.WaitFor(t, 5*time.Second, ownerNC.IsReconnecting, "the owner's connection is not reconnecting")
	// Accepted by the owner (this node), handed to its send to the
	// subscriber's node, which the reconnecting connection refuses.
	_, err := owner.PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	link.Heal() // well within SubscriberTimeout
	testcluster.WaitFor(t, 5*time.Second, ownerNC.IsConnected, "the owner's connection did not reconnect")
	testcluster.WaitFor(t, 2*time.Second, func() bool { return got.Load() == 1 },
		"the at-least-once message never reached the subscriber after the owner's connection came back (got %d)", got.Load())
}

// A publish whose request the publisher's reconnecting connection refused
// (nats.ErrReconnectBufExceeded) was never sent: it is retried like an
// unreachable owner, within RequestTimeout, and arrives once the
// connection is back. It failed at once with ReasonTimeout (outcome
// unknown) before.
func TestPublishRetriesARequestTheReconnectingConnectionRefused(t *testing.T) {
	link, pubNC, publisher, owner := unbufferedPair(t)
	topic := ownedBy(t, owner, "publish-reconnect")
	var got atomic.Int64
	subscribe(t, owner, topic, func(context.Context, *pubsub.Message) error { got.Add(1); return nil })

	link.Cut()
	testcluster.WaitFor(t, 5*time.Second, pubNC.IsReconnecting, "the publisher's connection is not reconnecting")
	// The connection comes back well within RequestTimeout (3 s): the
	// fault's schedule, not a synchronisation.
	heal := time.AfterFunc(200*time.Millisecond, link.Heal)
	defer heal.Stop()
	ack, err := publisher.Publish(ctxT(t), topic, []byte("x"))
	require.NoError(t, err)
	require.Equal(t, 1, ack.Delivered)
	require.EqualValues(t, 1, got.Load())
}
