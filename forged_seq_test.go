package pubsub_test

import (
	"math"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// One forged delivery numbered past its owner's genuine batches (the
// owner's sequence number, or its producer's) makes the subscription drop
// every later genuine batch of that owner or producer as OutOfOrder, for as
// long as the owner's incarnation (or the producer) lives: the
// subscription stays open and receives nothing, and nothing on its side
// says why (the acks list OutOfOrder, which is never evicted). Found by
// TestSoakForgedAndMutatedTrafficStormShort (storm_test.go, soak tag) with ahead on. The owner-sequence
// forgery need not even run: a copy of the genuine batch with only its seq
// raised is answered with the genuine batch's outcome, and still moves the
// subscription's last seen owner batch (subscription_run.go: handle).
func TestForgedDeliveryAheadWedgesASubscription(t *testing.T) {
	if os.Getenv("PUBSUB_OPEN_DEFECTS") == "" {
		t.Skip("open defect (see the comment above): a forged delivery numbered ahead wedges a subscription; set PUBSUB_OPEN_DEFECTS=1 to run")
	}
	for _, tc := range []struct {
		name  string
		forge func(d *wire.DeliverBatch)
	}{
		{"owner sequence", func(d *wire.DeliverBatch) { d.Seq = math.MaxUint64 }},
		{"producer sequence", func(d *wire.DeliverBatch) { d.Seq, d.ProducerSeq = 0, math.MaxUint64 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, 2)
			topic := ownedBy(t, c.Nodes[0], "wedge")
			rec := newRecorder()
			s := subscribe(t, c.Nodes[1], topic, rec.handler)
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
			tc.forge(env.GetDeliver())
			forged, err := proto.Marshal(&env)
			require.NoError(t, err)
			require.NoError(t, raw.Publish("pubsub.node."+c.Nodes[1].ID(), forged))
			// Answered once the inbox dispatched the forged delivery.
			_, err = raw.Request("pubsub.node."+c.Nodes[1].ID(), []byte{0xff}, 5*time.Second)
			require.NoError(t, err)

			// The genuine batches after it reach the subscription again.
			for i := 1; i <= 3; i++ {
				ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
				require.NoError(t, err)
				require.Equal(t, pubsub.Accepted, ack.Status)
				require.Equal(t, 1, ack.Delivered, "a genuine batch after the forged one: %+v", ack)
			}
			got := rec.of(s.ID())
			require.Equal(t, []string{"m00001", "m00002", "m00003"}, got[max(0, len(got)-3):])
		})
	}
}
