package pubsub_test

import (
	"bytes"
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// mixedPayloadCluster is a routed cluster of len(payloads) servers, server i
// with max_payload payloads[i], and one node "h<i>" on each, joined with
// fast and opts(i) (opts may be nil).
func mixedPayloadCluster(t *testing.T, payloads []int32, opts func(i int) []pubsub.Option) []*pubsub.Node {
	t.Helper()
	var servers []*server.Server
	t.Cleanup(func() {
		for _, s := range servers {
			s.Shutdown()
		}
		for _, s := range servers {
			s.WaitForShutdown()
		}
	})
	for i, mp := range payloads {
		s, err := embedded.StartServerWith(func(o *server.Options) {
			o.ServerName = "m" + strconv.Itoa(i)
			o.MaxPayload = mp
			o.Cluster = server.ClusterOpts{Name: "mixed", Host: "127.0.0.1", Port: server.RANDOM_PORT, PoolSize: -1}
			if i > 0 {
				o.Routes = server.RoutesFromStr("nats://" + servers[0].ClusterAddr().String())
			}
		})
		require.NoError(t, err)
		servers = append(servers, s)
	}
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		for _, s := range servers {
			if s.NumRoutes() != len(servers)-1 {
				return false
			}
		}
		return true
	}), "route mesh")
	var nodes []*pubsub.Node
	for i, s := range servers {
		nc, err := nats.Connect(s.ClientURL())
		require.NoError(t, err)
		t.Cleanup(nc.Close)
		all := append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID("h"+strconv.Itoa(i)))
		if opts != nil {
			all = append(all, opts(i)...)
		}
		n, err := pubsub.Join(ctxT(t), nc, all...)
		require.NoError(t, err)
		t.Cleanup(func() { _ = n.Close(context.Background()) })
		nodes = append(nodes, n)
	}
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		for _, n := range nodes {
			if len(n.Members()) != len(nodes) {
				return false
			}
		}
		return true
	}), "views converge")
	return nodes
}

// TestMixedMaxPayloadOwnerOnASmallServer: servers of one routed cluster
// with different max_payload (h0's 64 kB, h1's and h2's 8 kB). h0 publishes
// to a topic h1 owns, with a subscriber on every node. Members advertise
// their server's max_payload in heartbeats and MaxMessageSize is the
// smallest owner's limit, on every node: a 32 kB message, which fits h0's
// server but not h1's, is rejected at h0 with ErrTooLarge and delivers
// nothing; a batch of 6 kB messages only too large in total is split and
// reaches every subscriber, acks exact. Before the fix h1 accepted both, ran
// its own subscriber only and reported the others Timeout: its forwards
// failed at once with nats.ErrMaxPayload on its own server (5 of 5).
func TestMixedMaxPayloadOwnerOnASmallServer(t *testing.T) {
	nodes := mixedPayloadCluster(t, []int32{64 << 10, 8 << 10, 8 << 10}, nil)
	for _, n := range nodes {
		require.Equal(t, nodes[1].MaxMessageSize(), n.MaxMessageSize(), "%s: the smallest owner's limit applies", n.ID())
	}
	require.Less(t, nodes[0].MaxMessageSize(), 8<<10)
	topic := ownedBy(t, nodes[1], "mixed")
	rec := newRecorder()
	var subs []*pubsub.Subscription
	for _, n := range nodes {
		subs = append(subs, subscribe(t, n, topic, rec.handler))
	}
	t.Run("one message too large for the owner", func(t *testing.T) {
		ack, err := nodes[0].Publish(ctxT(t), topic, bytes.Repeat([]byte("x"), 32<<10))
		require.ErrorIs(t, err, pubsub.ErrTooLarge)
		require.Equal(t, pubsub.Rejected, ack.Status)
		require.Equal(t, pubsub.ReasonTooLarge, ack.Reason)
		require.Zero(t, rec.total(), "a rejected publish delivered nothing")
	})
	t.Run("batch too large in total for the owner", func(t *testing.T) {
		batch := make([][]byte, 8)
		want := make([]string, len(batch))
		for i := range batch {
			batch[i] = bytes.Repeat([]byte{byte('a' + i)}, 6<<10)
			want[i] = string(batch[i])
		}
		ack, err := nodes[0].PublishBatch(ctxT(t), topic, batch)
		mustAccept(t, ack, err, 3)
		require.Equal(t, len(batch), ack.Messages)
		for _, s := range subs {
			require.Equal(t, want, rec.of(s.ID()), "subscriber %s", s.ID())
		}
	})
}

// TestMixedMaxPayloadSubscribersOnSmallServersReceive: the owner and the
// publisher on the server with the larger max_payload, client-only
// subscribers on servers with a smaller one. Client-only members own no
// topic, so their limit does not bound MaxMessageSize; routes and
// deliveries to clients carry any size, so nodes on the small servers
// receive (and report on) messages and batches larger than their own
// servers would let them publish.
func TestMixedMaxPayloadSubscribersOnSmallServersReceive(t *testing.T) {
	nodes := mixedPayloadCluster(t, []int32{64 << 10, 8 << 10, 8 << 10}, func(i int) []pubsub.Option {
		if i > 0 {
			return []pubsub.Option{pubsub.WithClientOnly()}
		}
		return nil
	})
	require.Greater(t, nodes[0].MaxMessageSize(), 32<<10, "client-only members do not bound it")
	topic := ownedBy(t, nodes[0], "mixed")
	rec := newRecorder()
	for _, n := range nodes {
		subscribe(t, n, topic, rec.handler)
	}
	ack, err := nodes[0].Publish(ctxT(t), topic, bytes.Repeat([]byte("x"), 32<<10))
	mustAccept(t, ack, err, 3)
	batch := make([][]byte, 8)
	for i := range batch {
		batch[i] = bytes.Repeat([]byte{byte('a' + i)}, 6<<10)
	}
	ack, err = nodes[0].PublishBatch(ctxT(t), topic, batch)
	mustAccept(t, ack, err, 3)
	require.Equal(t, 27, rec.total())
}

// TestMixedMaxPayloadLimitRecoversWhenTheSmallOwnerLeaves: the smallest
// owner's limit applies only while that owner is a member: once the node
// on the 8 kB server leaves, the others' MaxMessageSize is their own
// server's again.
func TestMixedMaxPayloadLimitRecoversWhenTheSmallOwnerLeaves(t *testing.T) {
	nodes := mixedPayloadCluster(t, []int32{64 << 10, 64 << 10, 8 << 10}, nil)
	require.Less(t, nodes[0].MaxMessageSize(), 8<<10)
	require.NoError(t, nodes[2].Close(ctxT(t)))
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		return nodes[0].MaxMessageSize() > 32<<10 && nodes[1].MaxMessageSize() > 32<<10
	}), "the limit did not recover after the small owner left: %d", nodes[0].MaxMessageSize())
}
