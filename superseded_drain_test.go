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
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// An older incarnation of a replaced ID that is closing (a draining Close,
// say the healed pod being terminated) answers what reaches its inbox
// CLOSED. A delivery meant for the newer incarnation answered CLOSED is
// SubscriberGone at the owner (remoteStatuses), which drops the newer
// one's live subscriber without a word, as the SubscriberGone the check in
// onDeliver is there to silence; a publish answered CLOSED is retried
// while the newer one may have served it. It must stay silent on those
// while draining too (an end-to-end probe, the older node closed right
// after the heal while an owner published to the replacement's subscriber,
// saw the subscriber dropped and later acks Delivered 0 in 1 of 20 runs).
// Forged deliveries, as in TestDeliveryForANewerIncarnationGoesUnanswered,
// to a node while its Close drains: one meant for a newer incarnation,
// then one for its own, repeatedly, on one connection. 5 of 5 runs
// answered the first CLOSED before the check moved to onInbox.
func TestDrainingNodeDoesNotAnswerForANewerIncarnation(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "to-incarnation-drain")
	inc := memberRef(t, c.Nodes[0], "n1").GetIncarnation()
	// n1's drain waits for a batch it accepted: its subscriber's handler
	// holds it until the probe is done.
	entered, release := make(chan struct{}, 1), make(chan struct{})
	subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-release
		return nil
	})
	published := make(chan error, 1)
	go func() {
		_, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
		published <- err
	}()
	<-entered

	raw := c.Connect(t, 1)
	replies := make(chan *nats.Msg, 1024)
	rs, err := raw.ChanSubscribe("drain-reply.*", replies)
	require.NoError(t, err)
	defer func() { _ = rs.Unsubscribe() }()
	require.NoError(t, raw.Flush())
	owner := &wire.MemberRef{NodeId: "n0", Incarnation: 1}
	send := func(to uint64, reply string) {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Owner: owner, Topic: "elsewhere",
			Subscribers: []string{"ghost-1"}, Packed: wire.Pack(nil, [][]byte{[]byte("z")}), Count: 1, ToIncarnation: to}}})
		require.NoError(t, err)
		require.NoError(t, raw.PublishRequest("pubsub.node.n1", reply, data))
	}

	closed := make(chan error, 1)
	go func() { closed <- c.Nodes[1].Close(ctxT(t)) }()
	own, ownClosed, newer := 0, 0, 0
	count := func(m *nats.Msg) {
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(m.Data, &env))
		switch m.Subject {
		case "drain-reply.newer":
			newer++
			if newer == 1 {
				t.Logf("answered for a newer incarnation: %v", &env)
			}
		case "drain-reply.own":
			own++
			if env.GetReply().GetCode() == wire.Reply_CLOSED {
				ownClosed++
			}
		}
	}
	// One meant for a newer incarnation, then one for its own, on one
	// connection: the node handles its inbox in order, so the first is
	// answered (if at all) before the second.
	deadline := time.Now().Add(5 * time.Second)
	for ownClosed < 5 && time.Now().Before(deadline) {
		send(inc+1, "drain-reply.newer")
		send(inc, "drain-reply.own")
		require.NoError(t, raw.Flush())
		for got := false; !got; {
			select {
			case m := <-replies:
				count(m)
				got = m.Subject == "drain-reply.own"
			case <-time.After(time.Second):
				got = true
			}
		}
	}
	close(release)
	require.NoError(t, <-closed)
	require.NoError(t, <-published)
	for len(replies) > 0 {
		count(<-replies)
	}
	t.Logf("own answered %d (%d CLOSED), newer's answered %d", own, ownClosed, newer)
	require.Equal(t, 5, ownClosed, "deliveries answered CLOSED while the node drained")
	assert.Zero(t, newer, "deliveries meant for a newer incarnation answered while draining")
}
