package pubsub

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// TestReplacedNoticeIsBelievedOnlyFromAPeerThatRanApart: a notice that a
// newer incarnation of this node's ID replaced it stops the node only when
// the node heard that incarnation itself and the notice comes from a peer
// it took back after they ran apart (replaced.go); otherwise anyone who
// can publish on the node's inbox could stop it, and two nodes joining
// with one ID at once could both end up stopped.
func TestReplacedNoticeIsBelievedOnlyFromAPeerThatRanApart(t *testing.T) {
	n, peerNode := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	sub, err := n.Subscribe(context.Background(), "replaced", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	notice := func(inc uint64) *wire.Heartbeat {
		return &wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: peerNode.selfRef(),
			Members: []*wire.MemberRef{{NodeId: n.self.ID, Incarnation: inc}}}
	}
	running := func() bool { return !n.life.closed.Load() }

	n.onReplacedNotice(notice(n.self.Incarnation + 1))
	assert.True(t, running(), "stopped though it never heard the newer incarnation")
	n.members.superseded.Store(true)
	n.onReplacedNotice(notice(n.self.Incarnation + 1))
	assert.True(t, running(), "stopped on a notice from a peer that never ran apart from it")

	n.members.mu.Lock()
	n.members.peers[peerNode.self.ID].apart = true
	n.members.mu.Unlock()
	n.onReplacedNotice(notice(n.self.Incarnation))
	assert.True(t, running(), "stopped on a notice naming its own incarnation (the replacement's copy)")
	n.onReplacedNotice(&wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: &wire.MemberRef{NodeId: peerNode.self.ID, Incarnation: peerNode.self.Incarnation + 1},
		Members: []*wire.MemberRef{{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1}}})
	assert.True(t, running(), "stopped on a notice from an incarnation of the peer it does not know")

	n.onReplacedNotice(notice(n.self.Incarnation + 1))
	require.False(t, running(), "a credible notice did not stop the node")
	select {
	case <-sub.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stopped node's subscription did not end")
	}
	require.ErrorIs(t, sub.Err(), ErrClosed)
	assert.Contains(t, sub.Err().Error(), "another node joined with its ID")
}
