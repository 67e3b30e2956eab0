package pubsub

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// quietNodeReplaced makes pub take joiner, a newer incarnation of n's ID,
// for n's restart (as it does when n was quiet for two heartbeat intervals
// when joiner's JOIN came), and keeps joiner beating on the members subject,
// heard by both, until the test ends. It returns publish, which sends one
// more heartbeat of any kind for any incarnation of n's ID.
func quietNodeReplaced(t *testing.T, n, pub *Node, joiner *wire.MemberRef) (publish func(kind wire.Heartbeat_Kind, from *wire.MemberRef)) {
	t.Helper()
	publish = func(kind wire.Heartbeat_Kind, from *wire.MemberRef) {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{Kind: kind, From: from}}})
		require.NoError(t, err)
		require.NoError(t, pub.nc.Publish(n.members.subject, data))
	}
	pub.members.mu.Lock()
	pub.members.peers[n.self.ID].lastSeen = time.Now().Add(-time.Minute)
	pub.members.mu.Unlock()
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{Kind: wire.Heartbeat_JOIN, From: joiner}}})
	require.NoError(t, err)
	pub.onMembers(&nats.Msg{Subject: n.members.subject, Data: data})
	m, ok := pub.view().member(n.self.ID)
	require.True(t, ok && m.Incarnation == joiner.GetIncarnation(), "the peer did not take the joiner")
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(n.cfg.HeartbeatInterval)
		defer tick.Stop()
		for {
			publish(wire.Heartbeat_HEARTBEAT, joiner)
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return publish
}

// stopsReplaced waits up to 4 MemberTimeouts for n to stop as replaced.
func stopsReplaced(t *testing.T, n, pub *Node, sub *Subscription) {
	t.Helper()
	select {
	case <-sub.Done():
	case <-time.After(4 * n.cfg.MemberTimeout):
		t.Fatalf("the node its peer replaced by a beating joiner still runs after %v: peer's view %v, its view %v",
			4*n.cfg.MemberTimeout, pub.view().members, n.view().members)
	}
	require.ErrorIs(t, sub.Err(), ErrClosed)
	require.ErrorContains(t, sub.Err(), "another node joined with its ID")
}

// A briefly quiet node replaced by a joiner that is client-only (or the
// other way round: a restart with another WithClientOnly) stops like any
// other (replaced.go: noteReplacedView). It did not: the view it expected
// its peers to report gave the joiner this node's own ClientOnly, so it
// never matched, and the node ran on unrouted for as long as the joiner
// lived.
func TestQuietNodeReplacedByAClientOnlyJoinerStops(t *testing.T) {
	n, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	sub, err := n.Subscribe(context.Background(), "quiet", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	quietNodeReplaced(t, n, pub, &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1, ClientOnly: true})
	stopsReplaced(t, n, pub, sub)
}

// A briefly quiet node replaced by a joiner stops also when a third node
// with the ID tried to join meanwhile, failed on the conflict (it heard
// the older two) and left. The node compared its peers' view with the
// newest incarnation it ever heard, the one that left, not the one they
// serve, so it never matched, and the node ran on unrouted.
func TestQuietNodeReplacedStopsThoughALaterDuplicateLeft(t *testing.T) {
	n, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	sub, err := n.Subscribe(context.Background(), "quiet", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	publish := quietNodeReplaced(t, n, pub, &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1})
	third := &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 2}
	publish(wire.Heartbeat_JOIN, third)
	publish(wire.Heartbeat_LEAVE, third)
	stopsReplaced(t, n, pub, sub)
}
