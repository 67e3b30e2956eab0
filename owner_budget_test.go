package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// silentSubscriber joins the cluster as member id by heartbeating, and
// never reports a delivery: what a node behind a stalled route looks like
// to an owner. (It answers sync pulls, with no subscription, so that
// owners serve their topics.) It returns a function that subscribes it on
// owner to a topic owner owns, one that stops its heartbeats, and a count
// of the deliveries it got.
func silentSubscriber(t *testing.T, c *testcluster.Cluster, owner *pubsub.Node, id string) (subscribe func(topic string), stop func(), got func() int) {
	t.Helper()
	nc := c.Connect(t, 0)
	t.Cleanup(nc.Close)
	syncPage, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_OK,
		Sync: &wire.Sync{From: &wire.MemberRef{NodeId: id, Incarnation: 1}}}}})
	require.NoError(t, err)
	deliveries := make(chan struct{}, 1<<16)
	sub, err := nc.Subscribe("pubsub.node."+id, func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) != nil {
			return
		}
		switch env.Body.(type) {
		case *wire.Envelope_SyncRequest:
			_ = m.Respond(syncPage)
		case *wire.Envelope_Deliver:
			select {
			case deliveries <- struct{}{}:
			default:
			}
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, nc.Flush())
	stop = heartbeatAs(nc, id)
	t.Cleanup(stop)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(owner.Members()) == 2 }, "the silent member never joined the view")
	subscribe = func(topic string) {
		req, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Subscribe{Subscribe: &wire.SubscribeRequest{
			From: &wire.MemberRef{NodeId: id, Incarnation: 1}, Topic: topic, Subscriber: "s1"}}})
		require.NoError(t, err)
		testcluster.WaitFor(t, 5*time.Second, func() bool {
			rep, err := nc.Request("pubsub.node."+owner.ID(), req, time.Second)
			var env wire.Envelope
			return err == nil && proto.Unmarshal(rep.Data, &env) == nil && env.GetReply().GetCode() == wire.Reply_OK
		}, "the owner never took the silent member's subscription")
	}
	return subscribe, stop, func() int { return len(deliveries) }
}

// The batches an owner accepted and has not settled are bounded: an
// AckAccepted publish is answered at once, so while a node does not report
// (here: never), each delivery to it is held until SubscriberTimeout and,
// without a bound, the owner would hold publish rate x SubscriberTimeout
// of messages. Past its budget the owner refuses (OVERLOADED, counted,
// logged), the publisher retries within RequestTimeout and then fails with
// ErrQueueFull saying why; once the silent node leaves the view its
// deliveries settle and publishes are accepted again.
func TestOwnerRefusesPublishesPastItsInflightBudget(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 1, pubsub.WithSubscriberTimeout(time.Minute), pubsub.WithRequestTimeout(500*time.Millisecond))
	n := c.Nodes[0]
	subscribe, stop, got := silentSubscriber(t, c, n, "zz-silent")
	topic := ownedTopic(t, n, n.ID(), "budget")
	subscribe(topic)
	const budget, size = 16 << 10, 1 << 10
	n.SetOwnerInflightBudgetForTest(budget)
	data := make([]byte, size)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	accepted := 0
	var err error
	for accepted <= 2*budget/size {
		if _, err = n.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: data}}, pubsub.WithAck(pubsub.AckAccepted)); err != nil {
			break
		}
		accepted++
	}
	t.Logf("%d accepted, then: %v", accepted, err)
	require.ErrorIs(t, err, pubsub.ErrQueueFull, "after %d accepted", accepted)
	assert.Contains(t, err.Error(), "in flight")
	assert.LessOrEqual(t, accepted, budget/size+1, "accepted past the budget")
	assert.GreaterOrEqual(t, accepted, budget/size-1, "refused before the budget was used")
	assert.Positive(t, n.Stats().RequestsRefused)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return got() >= accepted }, "the silent member did not get the accepted batches")

	// The node falls silent for good: it leaves the view, its deliveries
	// settle, and the owner accepts again.
	stop()
	testcluster.WaitFor(t, 15*time.Second, func() bool {
		_, err := n.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: data}}, pubsub.WithAck(pubsub.AckAccepted))
		return err == nil
	}, "publishes still refused after the silent member left")
}
