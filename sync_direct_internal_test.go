package pubsub

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// directRequests keeps the latest request per subscriber, forgets only what
// an answer covers (by stamp), voids another incarnation's requests, and
// keeps its per-node count exact through every way out.
func TestDirectRequestsAccounting(t *testing.T) {
	x1, x2, y := Member{ID: "x", Incarnation: 1}, Member{ID: "x", Incarnation: 2}, Member{ID: "y", Incarnation: 1}
	count := func(d *directRequests) map[string]int {
		got := map[string]int{}
		for _, byNode := range d.byTopic {
			for node, locals := range byNode {
				got[node] += len(locals)
			}
		}
		for node, dn := range d.nodes {
			assert.Equal(t, got[node], dn.entries, "node %s's count", node)
		}
		assert.Len(t, d.nodes, len(got), "nodes counted without entries, or the other way round")
		return got
	}

	t.Run("latest wins and an answer covers only what came before its pull", func(t *testing.T) {
		var d directRequests
		require.True(t, d.record("t", x1, "a", true))
		since := d.stamp()
		require.True(t, d.record("t", x1, "a", false)) // after the pull was sent
		require.True(t, d.record("t", x1, "b", true))
		require.True(t, d.record("u", x1, "c", true))
		assert.Equal(t, map[string]int{"x": 3}, count(&d))
		d.answered("x", since) // covers nothing recorded after since
		assert.Equal(t, map[string]int{"x": 3}, count(&d))
		d.answered("x", d.stamp())
		assert.Equal(t, map[string]int{"x": 1}, count(&d), "a removal is kept until taken")
		assert.Equal(t, directEntry{subscribed: false, stamp: 2}, d.byTopic["t"]["x"]["a"])
	})

	t.Run("an eviction outlives the member's answer", func(t *testing.T) {
		// The owner evicts before the member hears of it: an answer to a
		// pull sent after the eviction may still list the subscriber.
		var d directRequests
		require.True(t, d.record("t", x1, "a", false))
		d.answered("x", d.stamp())
		got := d.applyTo("t", map[string]map[string]struct{}{"x": {"a": {}}}, newView(1, []Member{x1}))
		assert.Empty(t, got["x"], "the evicted subscriber came back with the answer")
		assert.Empty(t, count(&d))
	})

	t.Run("applied over the answers", func(t *testing.T) {
		var d directRequests
		require.True(t, d.record("t", x1, "a", false))
		require.True(t, d.record("t", x1, "b", true))
		require.True(t, d.record("t", y, "c", true))
		synced := map[string]map[string]struct{}{"x": {"a": {}, "z": {}}}
		got := d.applyTo("t", synced, newView(1, []Member{x1, y}))
		assert.Equal(t, map[string]map[string]struct{}{"x": {"b": {}, "z": {}}, "y": {"c": {}}}, got)
		assert.Empty(t, count(&d))
	})

	t.Run("another incarnation's requests are void", func(t *testing.T) {
		var d directRequests
		require.True(t, d.record("t", x1, "a", true)) // x's only entry: its count drops to 0 in applyTo
		got := d.applyTo("t", nil, newView(2, []Member{x2}))
		assert.Empty(t, got, "a request of incarnation 1 applied for incarnation 2")
		require.True(t, d.record("t", x1, "a", true))
		require.True(t, d.record("u", x2, "b", true)) // the new incarnation voids the old one's
		assert.Equal(t, map[string]int{"x": 1}, count(&d))
		assert.Nil(t, d.byTopic["t"])
		require.True(t, d.record("t", x1, "a", false)) // a late eviction of the old one's
		assert.Equal(t, map[string]int{"x": 1}, count(&d), "an older incarnation's record wiped the newer one's")
		assert.Contains(t, d.byTopic["u"]["x"], "b")
	})

	t.Run("forget, dropTopic and dropNode keep the count", func(t *testing.T) {
		var d directRequests
		require.True(t, d.record("t", x1, "a", true))
		require.True(t, d.record("t", x1, "b", true))
		require.True(t, d.record("u", x1, "c", true))
		require.True(t, d.record("u", y, "d", true))
		d.forget("t", "x", "a")
		d.forget("t", "x", "missing")
		assert.Equal(t, map[string]int{"x": 2, "y": 1}, count(&d))
		d.dropTopic("u")
		assert.Equal(t, map[string]int{"x": 1}, count(&d))
		d.dropNode("x")
		assert.Empty(t, count(&d))
		assert.Empty(t, d.byTopic)
	})

	t.Run("bounded per node", func(t *testing.T) {
		var d directRequests
		d.nodes = map[string]directNode{"x": {inc: 1, entries: maxSubscriptions - 1}}
		d.byTopic = map[string]map[string]map[string]directEntry{}
		require.True(t, d.record("t", x1, "a", true))
		assert.False(t, d.record("t", x1, "b", true), "past the bound")
		assert.True(t, d.record("t", x1, "a", false), "a subscriber already held is updated at the bound")
		assert.True(t, d.record("t", y, "c", true), "another node has its own bound")
		assert.Equal(t, maxSubscriptions, d.nodes["x"].entries)
		assert.NotContains(t, d.byTopic["t"]["x"], "b")
	})
}
