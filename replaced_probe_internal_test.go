package pubsub

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A node replaced while briefly quiet by a joiner its peer serves, where
// the joiner crashes (no LEAVE) after more than half of MemberTimeout of
// the peer's reports but before all of it. The node stopped MemberTimeout
// after the first report, as the newer one had beaten within half of
// MemberTimeout (replacedForGood), although it was dead: the peer dropped
// it soon after, and nobody held the ID. The node must run on, and its
// peer take it back.
func TestQuietNodeRunsOnWhenItsReplacementCrashesLateInTheWait(t *testing.T) {
	n, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second))
	sub, err := n.Subscribe(context.Background(), "quiet", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	_, crash := quietNodeReplaced(t, n, pub, &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.self.Incarnation + 1})
	var since time.Time
	waitForTest(t, "the node to see its peer report the joiner in its place", func() bool {
		n.members.mu.Lock()
		defer n.members.mu.Unlock()
		since = n.members.sameID.replacedView.since
		return !since.IsZero()
	})
	waitForTest(t, "0.7 MemberTimeout of reports", func() bool { return time.Since(since) > 7*n.cfg.MemberTimeout/10 })
	crash()
	waitForTest(t, "the peer to take the node back, or the node to stop", func() bool {
		m, ok := pub.view().member(n.self.ID)
		return n.life.closed.Load() || ok && m.Incarnation == n.self.Incarnation
	})
	require.False(t, n.life.closed.Load(), "the node stopped though the joiner had crashed: %v", sub.Err())
}
