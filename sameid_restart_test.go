package pubsub_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// An owner refuses (NOT_READY) a publish from a node it has not heard, as it
// refuses such a subscribe: that node's subscribers are missing from its
// registry. Found by TestSoakSameIDRestartUnderTraffic/crash-route-stalled-in (soak tag):
// a node that joined while it heard nobody (the routes into its server
// stalled) owned every topic alone, and at the heal it served the requests
// its peers had sent it through the stall before it had taken them in, to
// its own subscriber only, acked Delivered 1 with no failure listed while
// the peers' subscribers got nothing.
func TestPublishFromANodeTheOwnerHasNotHeardIsRefused(t *testing.T) {
	c := newCluster(t, 1, 2)
	owner := c.Nodes[1]
	topic := ownedBy(t, owner, "unheard-publisher")
	rec := newRecorder()
	sub := subscribe(t, c.Nodes[0], topic, rec.handler)
	raw := c.Connect(t, 0)
	ask := func(from *wire.MemberRef, data string) wire.Reply_Code {
		req := wire.AppendPublish(nil, &wire.PublishRequest{From: from, Topic: topic, Count: 1}, [][]byte{[]byte(data)}, nil)
		reply, err := raw.Request("pubsub.node."+owner.ID(), req, 5*time.Second)
		require.NoError(t, err)
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(reply.Data, &env))
		return env.GetReply().GetCode()
	}
	assert.Equal(t, wire.Reply_NOT_READY, ask(&wire.MemberRef{NodeId: "stranger", Incarnation: 1}, "stranger"))
	n0 := memberRef(t, owner, c.Nodes[0].ID())
	assert.Equal(t, wire.Reply_NOT_READY, ask(&wire.MemberRef{NodeId: n0.GetNodeId(), Incarnation: n0.GetIncarnation() + 1}, "newer"),
		"an incarnation of a member the owner has not heard")
	assert.Equal(t, wire.Reply_OK, ask(n0, "member"))
	testcluster.WaitFor(t, 5*time.Second, func() bool { return rec.total() == 1 }, "the member's publish was not delivered")
	assert.Equal(t, []string{"member"}, rec.of(sub.ID()))
}

// A node that joined while it heard nobody (the route into its server
// stalled one way) serves alone the topics it owns; at the heal it hears
// the peers by their ordinary heartbeats, which count as returns (they ran
// without it), so the topics it served alone must wait for their
// subscriptions before serving again. The return came right after the
// node's first view, of epoch 0, and view.returned names the epoch before a
// return with 0 meaning none: the topic was kept and served without the
// peer's subscriber, acked Delivered 1 with no failure listed (the same-ID
// restart probe: 11 of 20 runs, with the unheard-publisher check 1 of 20).
// Epochs now start at 1.
func TestNodeThatJoinedAloneWaitsForItsPeersSubscriptions(t *testing.T) {
	c := testcluster.NewFaulty(t, 2, 1, fast...)
	n0 := c.Nodes[0]
	b := c.AddNode(t, "b", 1, fast...)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return hasMember(n0, "b") && hasMember(b, "n0") }, "b not joined")
	topic := ownedBy(t, b, "joined-alone") // by ID: b's next incarnation owns it too
	c.CloseNode(t, 1)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(n0, "b") }, "b did not leave")
	rec := newRecorder()
	sub := subscribe(t, n0, topic, rec.handler) // n0 owns it alone now

	c.StallRoute(0, 1) // server 1 hears nothing of server 0
	b2 := c.AddNode(t, "b", 1, fast...)
	require.Len(t, b2.Members(), 1, "b joined hearing nobody")
	testcluster.WaitFor(t, 10*time.Second, func() bool { m, err := n0.OwnerOf(topic); return err == nil && m.ID == "b" }, "n0 did not hear b join")
	own := subscribe(t, b2, topic, rec.handler) // b serves the topic alone
	c.HealAll()

	// Until b has n0's subscription, publishes are refused (NOT_READY,
	// retried); none is acked without it.
	for i := range 40 {
		ack, err := n0.Publish(ctxT(t), topic, msg(i))
		require.NoError(t, err, "publish %d", i)
		require.Equal(t, 2, ack.Delivered, "publish %d: ack %+v (n0's subscriber left out without a word)", i, ack)
	}
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(rec.of(sub.ID())) == 40 && len(rec.of(own.ID())) == 40 }, "deliveries")
}
