package pubsub

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
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
			status, processed := s.run(context.Background(), make([]Message, 3))
			assert.Equal(t, tc.wantStatus, status)
			assert.Equal(t, tc.wantProcessed, processed)
			assert.Equal(t, tc.wantCalls, calls)
		})
	}
}
