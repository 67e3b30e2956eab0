package pubsub

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"google.golang.org/protobuf/proto"
)

// A member a join reply lists comes with how long its lister has not heard
// it; one that crashed just before the join (listed as silent for most of
// MemberTimeout) is dropped by the joiner's sweep while it still joins.
// Installed by the sweep, that view did not count the peers added while
// joining as returned, and the join's own install then found no change and
// dropped the mark: the sweep leaves the change to joinView's install.
func TestSweepWhileJoiningLeavesTheViewToJoinView(t *testing.T) {
	n, v := joiningNodeForTest(t)
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	n.listedWhileJoining(&wire.MemberRef{NodeId: "alive", Incarnation: 2, SilentMs: 10})
	n.listedWhileJoining(&wire.MemberRef{NodeId: "crashed", Incarnation: 3, SilentMs: 900})
	n.listedWhileJoining(&wire.MemberRef{NodeId: "long-gone", Incarnation: 4, SilentMs: 1500})
	require.Contains(t, n.members.peers, "crashed")
	assert.NotContains(t, n.members.peers, "long-gone", "a member its lister has not heard for MemberTimeout was added")
	assert.WithinDuration(t, time.Now().Add(-900*time.Millisecond), n.members.peers["crashed"].lastSeen, 200*time.Millisecond,
		"a listed member counts as heard when its lister last heard it")
	n.members.peers["crashed"].lastSeen = time.Now().Add(-2 * time.Second) // its MemberTimeout passed
	n.dropSilentLocked()
	assert.NotContains(t, n.members.peers, "crashed")
	assert.Contains(t, n.members.peers, "alive")
	assert.True(t, n.members.views.viewPending, "the sweep installed a view while joining")
	assert.Same(t, v, n.view(), "the sweep installed a view while joining")
	require.True(t, n.installPendingLocked(), "joinView's install changed nothing")
	assert.Equal(t, v.epoch, n.view().returned, "the view installed while joining does not count the peers heard meanwhile as returned")
	assert.Len(t, n.view().members, 2)
}

// The same for a member's LEAVE heard while joining: the view it changes is
// joinView's to install.
func TestLeaveWhileJoiningLeavesTheViewToJoinView(t *testing.T) {
	n, v := joiningNodeForTest(t)
	n.members.mu.Lock()
	n.listedWhileJoining(&wire.MemberRef{NodeId: "stays", Incarnation: 2})
	n.listedWhileJoining(&wire.MemberRef{NodeId: "leaves", Incarnation: 3})
	n.members.mu.Unlock()
	leave, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_LEAVE, From: &wire.MemberRef{NodeId: "leaves", Incarnation: 3}}}})
	require.NoError(t, err)
	n.onMembers(&nats.Msg{Data: leave})
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	assert.NotContains(t, n.members.peers, "leaves")
	assert.Same(t, v, n.view(), "the LEAVE installed a view while joining")
	require.True(t, n.installPendingLocked(), "joinView's install changed nothing")
	assert.Equal(t, v.epoch, n.view().returned, "the view installed while joining does not count the peers heard meanwhile as returned")
	assert.Len(t, n.view().members, 2)
}

// A join reply lists the replier's view with how long it has not heard
// each member. A member of the view already dropped from its peers (this
// node joining itself, the change not installed yet) was sent as heard
// just now, and the joiner kept a departed member as fresh: it is sent as
// silent for longer than any MemberTimeout.
func TestJoinReplyMarksDroppedMembersSilent(t *testing.T) {
	n, _ := joiningNodeForTest(t)
	n.nc = &nats.Conn{} // beatRef asks it for its max_payload; nothing is sent
	v := newView(2, []Member{{ID: "a", Incarnation: 1}, {ID: "heard", Incarnation: 2}, {ID: "dropped", Incarnation: 3}})
	n.members.views.cur.Store(v)
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	n.members.peers["heard"] = &peer{m: Member{ID: "heard", Incarnation: 2}, lastSeen: time.Now().Add(-300 * time.Millisecond)}
	hb := n.joinReplyLocked(&wire.MemberRef{NodeId: "joiner", Incarnation: 9})
	silent := map[string]uint32{}
	for _, ref := range hb.GetMembers() {
		silent[ref.GetNodeId()] = ref.GetSilentMs()
	}
	require.Len(t, silent, 3)
	assert.Zero(t, silent["a"], "the replier itself")
	assert.InDelta(t, 300, silent["heard"], 150)
	assert.Greater(t, time.Duration(silent["dropped"])*time.Millisecond, time.Hour, "a member dropped from the peers was sent as heard")
	assert.Zero(t, hb.GetRefusedMaxMembers(), "a view with room refused the joiner")
}

// joiningNodeForTest returns a connectionless node "a" that has not joined
// yet, with membership state, and its one-member view.
func joiningNodeForTest(t *testing.T) (*Node, *view) {
	n, v := registryNodeForTest(t, Member{ID: "a", Incarnation: 1})
	n.cfg.MemberTimeout, n.cfg.MaxMembers, n.cfg.HeartbeatInterval = time.Second, 16, 50*time.Millisecond
	n.members.init(n)
	n.members.views.cur.Store(v)
	n.subscriber.init()
	n.rpc = &rpc{pending: map[uint64]*call{}} // a view change's control work sweeps it
	return n, v
}
