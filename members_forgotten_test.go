package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// TestPastMembersForgottenPastMaxMembersAreCounted: a node remembers
// graceful leaves (so a leaver's late heartbeats do not add it back) and
// members it timed out (so a replaced incarnation can be told), each within
// MaxMembers entries. Churn past that forgets the oldest record, and each
// one forgotten is counted in MembersForgotten; with the records kept, a
// leaver's late heartbeat is still ignored.
func TestPastMembersForgottenPastMaxMembersAreCounted(t *testing.T) {
	leakcheck.Parallel(t)
	const maxMembers = 3 // this node and two peers
	c := newCluster(t, 1, 1, pubsub.WithMaxMembers(maxMembers), pubsub.WithMemberTimeout(500*time.Millisecond))
	node := c.Nodes[0]
	raw := c.Connect(t, 0)
	members := func(want int, why string) {
		t.Helper()
		testcluster.WaitFor(t, 5*time.Second, func() bool { return node.Stats().Members == want },
			"%s: the view holds %d members, want %d", why, node.Stats().Members, want)
	}

	t.Run("graceful leaves", func(t *testing.T) {
		for i := range maxMembers {
			id := fmt.Sprintf("leaver-%d", i)
			require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, id, 1, 0)))
			members(2, id+" joined")
			require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_LEAVE, id, 1, 0)))
			members(1, id+" left")
		}
		assert.Zero(t, node.Stats().MembersForgotten, "%d leaves fit the record of MaxMembers", maxMembers)

		// The record is full: the next leave forgets the oldest, leaver-0.
		require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, "leaver-3", 1, 0)))
		members(2, "leaver-3 joined")
		require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_LEAVE, "leaver-3", 1, 0)))
		members(1, "leaver-3 left")
		testcluster.WaitFor(t, 5*time.Second, func() bool { return node.Stats().MembersForgotten == 1 },
			"MembersForgotten is %d after one leave past the record's bound, want 1", node.Stats().MembersForgotten)

		// A remembered leaver's late heartbeat is ignored; the forgotten
		// one's adds it back (until it times out), which is what the
		// counter warns of.
		require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, "leaver-3", 1, 0)))
		require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, "leaver-0", 1, 0)))
		members(2, "the forgotten leaver's late heartbeat")
		assert.NotContains(t, memberIDs(node.Members()), "leaver-3", "a remembered leaver's late heartbeat added it back")
		members(1, "the forgotten leaver timed out")
	})

	t.Run("members timed out", func(t *testing.T) {
		before := node.Stats().MembersForgotten
		// leaver-0 timed out above; two rounds of two silent members
		// make five records, two past the bound of three.
		for round := range 2 {
			for i := range 2 {
				id := fmt.Sprintf("silent-%d-%d", round, i)
				require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, id, 1, 0)))
			}
			members(3, "two silent members joined")
			members(1, "two silent members timed out")
		}
		testcluster.WaitFor(t, 5*time.Second, func() bool { return node.Stats().MembersForgotten == before+2 },
			"MembersForgotten went from %d to %d after five members timed out, want +2", before, node.Stats().MembersForgotten)
	})
}
