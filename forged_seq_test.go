package pubsub_test

import (
	"math"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// forgeAhead records a genuine delivery to a subscription on node 1 of a
// 2-node cluster (owner node 0), changes it with forge, sends the forgery
// to node 1's inbox and waits until the inbox dispatched it.
func forgeAhead(t *testing.T, c *testcluster.Cluster, topic string, forge func(d *wire.DeliverBatch)) {
	t.Helper()
	raw := c.Connect(t, 0)
	deliveries := make(chan *nats.Msg, 16)
	sub, err := raw.ChanSubscribe("pubsub.node."+c.Nodes[1].ID(), deliveries)
	require.NoError(t, err)
	require.NoError(t, raw.Flush())
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)
	var genuine []byte
	for genuine == nil {
		m := <-deliveries
		var env wire.Envelope
		if wire.Decode(m.Data, &env) == nil && env.GetDeliver() != nil {
			genuine = m.Data
		}
	}
	require.NoError(t, sub.Unsubscribe())
	var env wire.Envelope
	require.NoError(t, wire.Decode(genuine, &env))
	forge(env.GetDeliver())
	forged, err := proto.Marshal(&env)
	require.NoError(t, err)
	require.NoError(t, raw.Publish("pubsub.node."+c.Nodes[1].ID(), forged))
	// Answered once the inbox dispatched the forged delivery.
	_, err = raw.Request("pubsub.node."+c.Nodes[1].ID(), []byte{0xff}, 5*time.Second)
	require.NoError(t, err)
}

// A delivery forged in a live owner's name with its batch number raised
// (far, or by a few) moves the subscription's order mark past the batches
// the owner will number next, and the subscription would drop them all as
// OutOfOrder, open and silent.
// The owner's next batch is its first send to that node, which nothing
// can have overtaken: the subscriber's OutOfOrder for it tells the owner
// the mark is forged, and it evicts the subscription, which ends with an
// error saying so (found by TestSoakForgedAndMutatedTrafficStormShort with
// ahead on; before, the subscription received nothing, 5 of 5 runs).
func TestForgedDeliveryAheadOfItsOwnerEvictsTheSubscription(t *testing.T) {
	for _, tc := range []struct {
		name  string
		forge func(d *wire.DeliverBatch)
	}{
		{"run", func(d *wire.DeliverBatch) { d.Seq = math.MaxUint64 }},
		{"raised a little", func(d *wire.DeliverBatch) { d.Seq += 3 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, 2)
			topic := ownedBy(t, c.Nodes[0], "wedge")
			rec := newRecorder()
			s := subscribe(t, c.Nodes[1], topic, rec.handler)
			events := watch(t, c.Nodes[1])
			forgeAhead(t, c, topic, tc.forge)

			ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(1))
			require.NoError(t, err)
			assert.Zero(t, ack.Delivered)
			require.Len(t, ack.Failures, 1)
			assert.Equal(t, pubsub.OutOfOrder, ack.Failures[0].Status)
			select {
			case <-s.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the subscription whose mark was forged ahead was not ended")
			}
			require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
			assert.Contains(t, s.Err().Error(), "out-of-order")
			find(t, events, func(e pubsub.SubscriberEvicted) bool { return e.Subscriber == s.ID() && e.Status == pubsub.OutOfOrder })

			// Subscribed again, it receives the owner's batches.
			s2 := subscribe(t, c.Nodes[1], topic, rec.handler)
			for i := 2; i <= 3; i++ {
				ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
				mustAccept(t, ack, err, 1)
			}
			assert.Equal(t, []string{"m00002", "m00003"}, rec.of(s2.ID()))
		})
	}
}

// The same with a producer's number: a subscription drops a producer's
// batches numbered below the last it saw, and a batch retried through
// another owner after its owner moved can genuinely arrive after a later
// one, so no node can tell a forged producer mark from a genuine one. The
// subscription drops that producer's later batches (listed OutOfOrder in
// acks, DeliveryFailed at the owner) until the producer changes: a known
// limit (INTERNALS), kept here as a failing test.
func TestForgedDeliveryAheadOfItsProducerWedgesASubscription(t *testing.T) {
	if os.Getenv("PUBSUB_OPEN_DEFECTS") == "" {
		t.Skip("known limit (see the comment above): a delivery forged with a producer's number ahead wedges that producer's batches at a subscription; set PUBSUB_OPEN_DEFECTS=1 to run")
	}
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[0], "wedge")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[1], topic, rec.handler)
	forgeAhead(t, c, topic, func(d *wire.DeliverBatch) { d.Seq, d.ProducerSeq = 0, math.MaxUint64 })
	for i := 1; i <= 3; i++ {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		require.NoError(t, err)
		require.Equal(t, 1, ack.Delivered, "a genuine batch after the forged one: %+v", ack)
	}
	assert.Equal(t, []string{"m00001", "m00002", "m00003"}, rec.of(s.ID())[1:])
}
