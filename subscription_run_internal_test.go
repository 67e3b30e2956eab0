package pubsub

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// run checks the subscription right before each handler call: one ended
// before the batch's first message (after handle's own check, while the
// order checks ran) hands the handler nothing, and one ended by the handler
// stops after the current message.
func TestRunHandsNoMessageAfterTheSubscriptionEnded(t *testing.T) {
	for _, tc := range []struct {
		name          string
		endBefore     bool // ended before run
		endAt         int  // the handler ends it while handling this message; -1: never
		wantStatus    DeliveryStatus
		wantProcessed int
		wantCalls     int
	}{
		{name: "ended before the first message", endBefore: true, endAt: -1, wantStatus: SubscriberGone, wantProcessed: 0, wantCalls: 0},
		{name: "ended by the first message's handler", endAt: 0, wantStatus: SubscriberGone, wantProcessed: 1, wantCalls: 1},
		{name: "ended by the last message's handler", endAt: 2, wantStatus: Delivered, wantProcessed: 3, wantCalls: 3},
		{name: "not ended", endAt: -1, wantStatus: Delivered, wantProcessed: 3, wantCalls: 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Subscription{node: &Node{}, done: make(chan struct{})}
			calls := 0
			s.handler = func(context.Context, *Message) error {
				if calls == tc.endAt {
					close(s.done)
				}
				calls++
				return nil
			}
			if tc.endBefore {
				close(s.done)
			}
			status, processed, err := s.run(context.Background(), make([]Message, 3))
			require.NoError(t, err)
			assert.Equal(t, tc.wantStatus, status)
			assert.Equal(t, tc.wantProcessed, processed)
			assert.Equal(t, tc.wantCalls, calls)
		})
	}
}

// splitGate runs a broadcast subscriber's chunks of a split batch in order
// from the first it gets, none after one it did not run, and answers a
// chunk seen before with its outcome; a group member's are not gated. A
// chunk a full mailbox refused never reaches the gate: the gate still runs
// no later chunk of its batch, unless the refused chunk ran after all (its
// retry).
func TestSplitGate(t *testing.T) {
	const refused = DeliveryStatus(255) // a step the mailbox refused
	type step struct {
		chunk  uint32
		run    bool           // the gate lets it run
		status DeliveryStatus // what it ran to, or what the gate answers
	}
	for _, tc := range []struct {
		name  string
		local string
		steps []step
	}{
		{name: "in order", local: "s", steps: []step{{0, true, Delivered}, {1, true, Delivered}, {2, true, Delivered}}},
		{name: "after a failed chunk", local: "s", steps: []step{{0, true, HandlerError}, {1, false, OutOfOrder}, {2, false, OutOfOrder}}},
		{name: "after a timed out chunk", local: "s", steps: []step{{0, true, Delivered}, {1, true, Timeout}, {2, false, OutOfOrder}}},
		{name: "after a gap", local: "s", steps: []step{{0, true, Delivered}, {2, false, OutOfOrder}, {3, false, OutOfOrder}}},
		{name: "the same chunk again", local: "s", steps: []step{{0, true, Delivered}, {0, false, Delivered}, {1, true, Delivered}}},
		{name: "subscribed between chunks", local: "s", steps: []step{{2, true, Delivered}, {3, true, Delivered}}},
		{name: "a group member", local: "s@g", steps: []step{{0, true, HandlerError}, {2, true, Delivered}}},
		{name: "refused: the first chunk", local: "s", steps: []step{{0, false, refused}, {1, false, OutOfOrder}, {2, false, OutOfOrder}}},
		{name: "refused: a later chunk", local: "s", steps: []step{{0, true, Delivered}, {1, false, refused}, {2, false, OutOfOrder}}},
		{name: "refused: run on its retry", local: "s", steps: []step{{0, false, refused}, {0, true, Delivered}, {1, true, Delivered}}},
		{name: "refused while an earlier one waits", local: "s", steps: []step{{1, false, refused}, {0, true, Delivered}, {2, false, OutOfOrder}}},
		{name: "refused: a group member", local: "s@g", steps: []step{{0, false, refused}, {1, true, Delivered}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Subscription{id: SubscriberID{Node: "n", Local: tc.local}}
			for _, st := range tc.steps {
				c := splitChunk{id: 7, index: st.chunk}
				if st.status == refused {
					s.noteRefusedSplit(c)
					continue
				}
				got, _, run := s.splitGate(c)
				assert.Equal(t, st.run, run, "chunk %d", st.chunk)
				if run {
					got = st.status
				} else {
					assert.Equal(t, st.status, got, "chunk %d", st.chunk)
				}
				s.noteSplit(c, got)
			}
		})
	}
	t.Run("a batch sent whole", func(t *testing.T) {
		s := &Subscription{id: SubscriberID{Node: "n", Local: "s"}}
		_, _, run := s.splitGate(splitChunk{})
		assert.True(t, run)
		s.noteSplit(splitChunk{}, HandlerError)
		assert.Empty(t, s.split.marks)
	})
}
