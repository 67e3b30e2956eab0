package pubsub

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The smaller maps kept per producer or per split batch (a group's
// round-robin starts, a group member's refused shares, a subscription's
// split marks) forget an arbitrary entry past their bound. Each forget is
// counted in.stats.marksForgotten.Load() and logged at debug level,
// throttled: they were silent before.
func TestSmallerMarkMapsCountAndLogTheirForgets(t *testing.T) {
	cases := []struct {
		name  string
		bound int
		setup func(n *Node) (fill func(i int), size func() int)
	}{
		{"producers/rr-starts", maxRRStarts, func(n *Node) (func(int), func() int) {
			a := &topicActor{n: n, topic: "t"}
			require.True(t, a.add("a", 1, "1@g"))
			p := a.plan()
			return func(i int) { p.assign(1, nil, batchOrigin{producer: fmt.Sprint("p", i), seq: 1}, n) },
				func() int { return len(p.groups[0].starts) }
		}},
		{"producers/refused-shares", maxRefusedProducers, func(n *Node) (func(int), func() int) {
			var r refusedShares
			return func(i int) { r.note(n, batchOrigin{producer: fmt.Sprint("p", i), seq: 1}) },
				func() int { return len(r.by) }
		}},
		{"producers/split-marks", maxTrackedSplits, func(n *Node) (func(int), func() int) {
			s := &Subscription{node: n, id: SubscriberID{Node: "o", Local: "s-1"}}
			return func(i int) { s.noteSplit(splitChunk{id: uint64(i + 1), index: 1}, Delivered) },
				func() int { return len(s.split.marks) }
		}},
		{"producers/split-refused", maxTrackedSplits, func(n *Node) (func(int), func() int) {
			s := &Subscription{node: n, id: SubscriberID{Node: "o", Local: "s-1"}}
			return func(i int) { s.noteRefusedSplit(splitChunk{id: uint64(i + 1), index: 1}) },
				func() int { return len(s.split.refused) }
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var logs strings.Builder
			n := &Node{self: Member{ID: "o", Incarnation: 1},
				log: nodeLogger{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
					limit: logThrottle{interval: time.Hour}}}
			n.events = newEventStream("o")
			fill, size := tc.setup(n)
			for i := range tc.bound {
				fill(i)
			}
			require.Equal(t, tc.bound, size())
			require.Zero(t, n.stats.marksForgotten.Load(), "forgotten within the bound")
			for i := range 3 {
				fill(tc.bound + i)
			}
			assert.Equal(t, tc.bound, size(), "the map's size past its bound")
			assert.Equal(t, uint64(3), n.stats.marksForgotten.Load())
			assert.Equal(t, 1, strings.Count(logs.String(), "map="+tc.name), "log lines (throttled): %s", logs.String())
		})
	}
}
