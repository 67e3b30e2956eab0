package pubsub_test

import (
	"bytes"
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// An owner's first send of a batch can genuinely arrive after its next
// batch: NATS keeps a connection's messages in order only while it stays
// on one server. Batch 1 waits on a slow route from server 0 to the
// subscriber's server 2 when the owner's connection fails over to server
// 1; batch 2 then goes 1 -> 2 and is handled first, and batch 1, its
// first send, arrives late. The subscriber drops it as OutOfOrder; the
// subscription is healthy and must not be evicted for it.
func TestFirstSendOvertakenAcrossAReconnectDoesNotEvict(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 0, fast...)
	u, err := url.Parse(c.Servers.Servers[0].ClientURL())
	require.NoError(t, err)
	link, err := faultnet.Listen(u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { _ = link.Close() })
	nc, err := nats.Connect("nats://"+link.Addr()+","+c.Servers.Servers[1].ClientURL(), nats.DontRandomize(),
		nats.IgnoreDiscoveredServers(), nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond), nats.NoCallbacksAfterClientClose())
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	owner, err := pubsub.Join(ctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID("own"))...)
	cancel()
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = owner.Close(ctx)
	})
	subNode := c.AddNode(t, "sub", 2, fast...)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(owner.Members()) == 2 && len(subNode.Members()) == 2 }, "views")
	topic := ownedBy(t, owner, "reorder")
	rec := newRecorder()
	s := subscribe(t, subNode, topic, rec.handler)
	ack, err := owner.Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)

	// A watcher on server 0 sees batch 1 when server 0 has routed it. The
	// owner's AckAccepted answer comes just before its sends are written, so
	// neither the answer nor a flush of its connection proves that: batch 1
	// written after the cut would take the new server's route first, or be
	// lost with the old connection.
	watchConn := c.Connect(t, 0)
	watcher, err := watchConn.SubscribeSync(natsutil.NodeSubject(c.Prefix(), subNode.ID()))
	require.NoError(t, err)
	require.NoError(t, watchConn.Flush())
	c.StallRoute(0, 2)
	_, err = owner.PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: msg(1)}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	for routed := false; !routed; { // server 0 took batch 1: it waits on the stalled route
		m, err := watcher.NextMsg(5 * time.Second)
		require.NoError(t, err, "server 0 never saw batch 1")
		routed = bytes.Contains(m.Data, msg(1))
	}
	link.Cut()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return nc.IsConnected() && nc.ConnectedUrl() == c.Servers.Servers[1].ClientURL() },
		"the owner's connection did not fail over to server 1")
	_, err = owner.PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: msg(2)}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(rec.of(s.ID())) == 2 }, "batch 2 not handled: %v", rec.of(s.ID()))
	require.Equal(t, []string{"m00000", "m00002"}, rec.of(s.ID()))
	events := watch(t, owner)
	c.Route(0, 2).Heal() // batch 1 arrives, after batch 2
	find(t, events, func(e pubsub.DeliveryFailed) bool { return e.Subscriber == s.ID() && e.Status == pubsub.OutOfOrder })
	select {
	case <-s.Done():
		t.Fatalf("a healthy subscription was evicted for a batch a reconnect let its next one overtake: %v", s.Err())
	case <-time.After(time.Second): // the eviction, queued before the event, would have ended it by now
	}
	ack, err = owner.Publish(ctxT(t), topic, msg(3))
	mustAccept(t, ack, err, 1)
}
