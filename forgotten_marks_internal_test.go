package pubsub

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
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
		{"producers/split-marks", maxTrackedSplits, func(n *Node) (func(int), func() int) {
			s := &Subscription{node: n, id: SubscriberID{Node: "o", Local: "s-1"}}
			return func(i int) { s.noteSplit(splitChunk{id: uint64(i + 1), index: 1}, Delivered) },
				func() int { return len(s.split.marks) }
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

// The maps a full mailbox's refusals fill, on the delivery path: a group
// member's refused shares (maxRefusedProducers producers) and a broadcast
// subscriber's refused split chunks (maxTrackedSplits batches). Their
// forgets are counted once the subscriber lock is released, as the hooks
// are, so a user's slog handler never runs under it.
func TestRefusedMarksForgottenOnTheDeliveryPathAreCounted(t *testing.T) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	a := joinForTest(t, s.ClientURL(), "a", 50*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	release := make(chan struct{})
	held := func(context.Context, *Message) error { <-release; return nil }
	member, err := a.Subscribe(ctx, "t", held, WithGroup("g"), WithSubscriptionMailbox(1))
	require.NoError(t, err)
	broadcast, err := a.Subscribe(ctx, "t", held, WithSubscriptionMailbox(1))
	require.NoError(t, err)
	defer func() {
		close(release)
		require.NoError(t, a.Close(ctx))
	}()
	deliver := func(origin batchOrigin) []DeliveryStatus {
		done := make(chan []DeliveryStatus, 1)
		a.deliver("t", []string{broadcast.ID().Local}, []share{{local: member.ID().Local, idx: []uint32{0}}},
			payload{msgs: msgBatch{data: [][]byte{[]byte("x")}}, origin: origin},
			func(st []DeliveryStatus, _, _ []uint32) { done <- slices.Clone(st) })
		select {
		case st := <-done:
			return st
		case <-time.After(50 * time.Millisecond): // queued behind the held handler: no report yet
			return nil
		}
	}
	// Fill both mailboxes: the first batch runs (held), later ones queue.
	waitForTest(t, "both mailboxes full", func() bool {
		st := deliver(batchOrigin{})
		return st != nil && st[0] == MailboxFull && st[1] == MailboxFull
	})
	require.Zero(t, a.Stats().ProducerMarksForgotten)
	const batches = maxRefusedProducers + 3
	for i := range batches {
		st := deliver(batchOrigin{producer: fmt.Sprint("p", i), seq: 1, split: splitChunk{id: uint64(i + 1), index: 1}})
		require.Equal(t, []DeliveryStatus{MailboxFull, MailboxFull}, st, "batch %d", i)
	}
	assert.Equal(t, uint64(batches-maxRefusedProducers+batches-maxTrackedSplits), a.Stats().ProducerMarksForgotten,
		"forgets: %d producers past %d refused shares, %d split batches past %d", batches, maxRefusedProducers, batches, maxTrackedSplits)
}
