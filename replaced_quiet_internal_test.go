package pubsub

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// quietNodeReplaced makes pub take joiner, a newer incarnation of n's ID,
// for n's restart (as it does when n was quiet for two heartbeat intervals
// when joiner's JOIN came), and keeps joiner beating on the members subject,
// heard by both, until the test ends or it calls crash. publish sends one
// more heartbeat of any kind for any incarnation of n's ID.
func quietNodeReplaced(t *testing.T, n, pub *Node, joiner *wire.MemberRef) (publish func(kind wire.Heartbeat_Kind, from *wire.MemberRef), crash func()) {
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
	var once sync.Once
	crash = func() { once.Do(func() { close(stop); <-done }) }
	t.Cleanup(crash)
	return publish, crash
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
	publish, _ := quietNodeReplaced(t, n, pub, &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1})
	third := &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 2}
	publish(wire.Heartbeat_JOIN, third)
	publish(wire.Heartbeat_LEAVE, third)
	stopsReplaced(t, n, pub, sub)
}

// A live node that hears another incarnation of its ID beat for longer
// than MemberTimeout, one its peer never takes in its place (the node is not
// quiet: a forger beside it, or a duplicate whose Join is failing), or an
// older one (its own previous life's heartbeats, delayed by a route stall
// after a restart), runs on: only the peers' reports of the newer one in
// its place for MemberTimeout stop it (noteReplacedView).
func TestLiveNodeHearingAnotherIncarnationItsPeerDoesNotServeRunsOn(t *testing.T) {
	leakcheck.Parallel(t)
	for _, tc := range []struct {
		name string
		inc  func(self uint64) uint64
	}{
		{"newer", func(self uint64) uint64 { return self + 1 }},
		{"older", func(self uint64) uint64 { return self - 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// 2 heartbeat intervals of 200 ms: a loaded machine must not
			// make the live node look quiet to its peer.
			n, pub := ownerAndPublisher(t, WithHeartbeatInterval(200*time.Millisecond), WithMemberTimeout(800*time.Millisecond))
			other := &wire.MemberRef{NodeId: n.self.ID, Incarnation: tc.inc(n.self.Incarnation)}
			data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{Kind: wire.Heartbeat_HEARTBEAT, From: other}}})
			require.NoError(t, err)
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for end := time.Now().Add(n.cfg.MemberTimeout + 2*n.cfg.HeartbeatInterval); time.Now().Before(end); <-tick.C {
				require.NoError(t, pub.nc.Publish(n.members.subject, data))
				require.False(t, n.life.closed.Load(), "the live node stopped")
			}
			m, ok := pub.view().member(n.self.ID)
			require.True(t, ok && m.Incarnation == n.self.Incarnation, "the peer took the other incarnation: %v", pub.view().members)
			require.False(t, n.life.closed.Load(), "the live node stopped")
		})
	}
}

// A node replaced while briefly quiet by a joiner that then crashed (its
// Join failed on the conflict and its LEAVE was lost, say) is taken back
// by its peer once the joiner times out. The peer's reports of the joiner
// in its place are then history: a later duplicate with the ID, which its
// peer never serves, must not stop it at once (noteReplacedView forgets
// them when the peer reports this node's own view again).
func TestNodeTakenBackAfterTheJoinerCrashedRunsOnAgainstALaterDuplicate(t *testing.T) {
	n, pub := ownerAndPublisher(t, WithHeartbeatInterval(200*time.Millisecond), WithMemberTimeout(800*time.Millisecond))
	publish, crash := quietNodeReplaced(t, n, pub, &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1})
	waitForTest(t, "the node to see its peer report the joiner in its place", func() bool {
		n.members.mu.Lock()
		defer n.members.mu.Unlock()
		return !n.members.sameID.replacedView.since.IsZero()
	})
	crash()
	waitForTest(t, "the peer to take the node back", func() bool {
		m, ok := pub.view().member(n.self.ID)
		return n.life.closed.Load() || ok && m.Incarnation == n.self.Incarnation
	})
	require.False(t, n.life.closed.Load(), "the node stopped though the joiner had crashed")
	later := &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 2}
	publish(wire.Heartbeat_JOIN, later)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for end := time.Now().Add(n.cfg.MemberTimeout / 2); time.Now().Before(end); <-tick.C {
		publish(wire.Heartbeat_HEARTBEAT, later)
		require.False(t, n.life.closed.Load(), "a later duplicate its peer never served stopped the node")
	}
	publish(wire.Heartbeat_LEAVE, later)
	m, ok := pub.view().member(n.self.ID)
	require.True(t, ok && m.Incarnation == n.self.Incarnation, "the peer took the later duplicate: %v", pub.view().members)
}
