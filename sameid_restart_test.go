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
