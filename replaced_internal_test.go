package pubsub

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// TestReplacedNoticeIsBelievedOnlyWhenThePeerServesTheNewer: a notice that
// a newer incarnation of this node's ID replaced it stops the node only
// when the node heard that incarnation itself and the notifying peer's last
// heartbeat reported this node's view with the newer incarnation in its
// place (replaced.go); otherwise anyone who can publish on the node's inbox
// could stop it with a notice in a live peer's name.
func TestReplacedNoticeIsBelievedOnlyWhenThePeerServesTheNewer(t *testing.T) {
	n, peerNode := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	sub, err := n.Subscribe(context.Background(), "replaced", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	newer := &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1}
	notice := func(about *wire.MemberRef) *wire.Heartbeat {
		return &wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: peerNode.selfRef(), Members: []*wire.MemberRef{about}}
	}
	running := func() bool { return !n.life.closed.Load() }

	n.onReplacedNotice(notice(newer))
	assert.True(t, running(), "stopped though it never heard the newer incarnation")
	n.members.sameID.superseded.Store(true)
	n.onReplacedNotice(notice(newer))
	assert.True(t, running(), "stopped on a notice from a peer whose heartbeats report this node's incarnation")

	// From here on the peer's last heartbeat reported the view with the
	// newer incarnation in this node's place (heartbeats keep coming: the
	// test sets it before each notice).
	servesNewer := func() {
		n.members.mu.Lock()
		n.members.peers[peerNode.self.ID].viewID = n.viewReplacedBy(newer)
		n.members.mu.Unlock()
	}
	servesNewer()
	n.onReplacedNotice(notice(&wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation}))
	assert.True(t, running(), "stopped on a notice naming its own incarnation (the replacement's copy)")
	servesNewer()
	n.onReplacedNotice(&wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: &wire.MemberRef{NodeId: peerNode.self.ID, Incarnation: peerNode.self.Incarnation + 1},
		Members: []*wire.MemberRef{newer}})
	assert.True(t, running(), "stopped on a notice from an incarnation of the peer it does not know")

	servesNewer()
	n.onReplacedNotice(notice(newer))
	require.False(t, running(), "a credible notice did not stop the node")
	select {
	case <-sub.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stopped node's subscription did not end")
	}
	require.ErrorIs(t, sub.Err(), ErrClosed)
	assert.Contains(t, sub.Err().Error(), "another node joined with its ID")
}

// TestSupersededEndsWhenTheNewerIncarnationLeaves: a node that heard a
// newer incarnation of its ID (a second node joining with it, which then
// fails on the conflict and takes its JOIN back) answers deliveries for
// any subscriber again once that incarnation's LEAVE arrives; an older
// incarnation's LEAVE does not count.
func TestSupersededEndsWhenTheNewerIncarnationLeaves(t *testing.T) {
	n, _ := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	beat := func(kind wire.Heartbeat_Kind, inc uint64) *nats.Msg {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
			Kind: kind, From: &wire.MemberRef{NodeId: n.self.ID, Incarnation: inc}}}})
		require.NoError(t, err)
		return &nats.Msg{Subject: n.members.subject, Data: data}
	}
	newer := n.self.Incarnation + 10
	n.onMembers(beat(wire.Heartbeat_JOIN, newer))
	require.True(t, n.members.sameID.superseded.Load(), "a newer incarnation's JOIN")
	n.onMembers(beat(wire.Heartbeat_LEAVE, newer-1))
	assert.True(t, n.members.sameID.superseded.Load(), "the LEAVE of another incarnation")
	n.onMembers(beat(wire.Heartbeat_LEAVE, newer))
	assert.False(t, n.members.sameID.superseded.Load(), "the newer incarnation left")
}

// TestMemberTakenBackIsNotToldItWasReplaced: a peer that once dropped a
// member for silence and took it back when its heartbeats returned kept
// that incarnation in membership.sameID.timedOut for good. Much later, a second
// node joining with the member's ID while the member was briefly quiet
// (two nodes joining with one ID at once: the older wins, the newer fails
// on the conflict) made the peer tell the live member that it was replaced,
// and the member stopped although it never ran apart from its peers.
func TestMemberTakenBackIsNotToldItWasReplaced(t *testing.T) {
	n, peerNode := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	id := n.self.ID
	hasIncarnation := func(inc uint64) func() bool {
		return func() bool {
			m, ok := peerNode.view().member(id)
			return ok && m.Incarnation == inc
		}
	}
	// The peer drops the member for silence (as its sweep does), and its
	// next heartbeat brings it back.
	peerNode.members.mu.Lock()
	p := peerNode.members.peers[id]
	delete(peerNode.members.peers, id)
	peerNode.members.sameID.noteTimedOut(p.m, peerNode.cfg.MaxMembers)
	peerNode.recomputeView()
	peerNode.members.mu.Unlock()
	waitForTest(t, "the member taken back", hasIncarnation(n.self.Incarnation))

	// A newer incarnation's JOIN while the member was quiet for more than
	// two heartbeats: the peer takes it for a restart; the member hears it.
	newer := n.self.Incarnation + 1
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_JOIN, From: &wire.MemberRef{NodeId: id, Incarnation: newer}}}})
	require.NoError(t, err)
	join := &nats.Msg{Subject: n.members.subject, Data: data}
	peerNode.members.mu.Lock()
	peerNode.members.peers[id].lastSeen = time.Now().Add(-time.Minute)
	peerNode.members.mu.Unlock()
	peerNode.onMembers(join)
	n.onMembers(join)
	require.True(t, hasIncarnation(newer)(), "the peer did not take the newer incarnation")

	// The newer one never beats again: the peer drops it after
	// MemberTimeout and takes the member back. The member must run on.
	stopped := func() bool { return n.life.closed.Load() }
	waitForTest(t, "the member taken back after the newer one timed out", func() bool { return stopped() || hasIncarnation(n.self.Incarnation)() })
	require.False(t, stopped(), "a member its peer dropped and took back long ago was stopped as replaced")
}
