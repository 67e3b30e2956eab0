package pubsub

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// The early answer arms only when the publisher stops waiting before the
// owner would answer anyway. A publisher with the owner's own timeouts
// and no shorter deadline never arms it, whatever the timeouts: with a
// margin of an eighth of the wait alone, SubscriberTimeout 10s and
// RequestTimeout 100ms armed it for every batch, answering 150 ms before
// the subscribers' own timeout.
func TestEarlyAnswerArmsOnlyForAShorterWait(t *testing.T) {
	for _, tc := range []struct {
		name            string
		subscriber, req time.Duration
		within          time.Duration // the publisher's wait
		level           AckLevel
		want            bool
	}{
		{name: "defaults, same timeouts", subscriber: 5 * time.Second, req: 5 * time.Second, within: 10 * time.Second},
		{name: "long subscriber timeout, short request timeout", subscriber: 10 * time.Second, req: 100 * time.Millisecond, within: 10*time.Second + 100*time.Millisecond},
		{name: "short request timeout alone", subscriber: 50 * time.Millisecond, req: 20 * time.Millisecond, within: 70 * time.Millisecond},
		{name: "a shorter deadline", subscriber: 5 * time.Second, req: 5 * time.Second, within: time.Second, want: true},
		{name: "a deadline already past", subscriber: 5 * time.Second, req: 5 * time.Second, within: -time.Second, want: true},
		{name: "AckAccepted", subscriber: 5 * time.Second, req: 5 * time.Second, within: time.Second, level: AckAccepted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Enough of a node for answerEarly, which a past deadline
			// runs at once.
			n := &Node{log: nodeLogger{Logger: slog.New(slog.DiscardHandler)}}
			n.members.views.cur.Store(newView(1, []Member{{ID: "o", Incarnation: 1}}))
			n.cfg.SubscriberTimeout, n.cfg.RequestTimeout = tc.subscriber, tc.req
			a := &topicActor{n: n, topic: "t"}
			answered := make(chan PublishAck, 1)
			b := &pendingBatch{a: a, answer: func(ans ownerAnswer) { answered <- ans.ack }, remaining: 1}
			msgs := payload{level: tc.level, answerBy: time.Now().Add(tc.within)}
			a.armEarlyAnswer(b, msgs, []nodeTarget{{node: "s", locals: []string{"1"}}})
			b.mu.Lock()
			early := b.early
			if early != nil && tc.within > 0 {
				early.timer.Stop()
			}
			b.mu.Unlock()
			if !assert.Equal(t, tc.want, early != nil) || early == nil {
				return
			}
			if tc.within > 0 {
				assert.Equal(t, waitingSubscribers{{Node: "s", Local: "1"}: 1}, early.waiting)
				return
			}
			select {
			case ack := <-answered:
				assert.Equal(t, []DeliveryFailure{{Subscriber: SubscriberID{Node: "s", Local: "1"}, Status: Timeout}}, ack.Failures)
			case <-time.After(5 * time.Second):
				t.Fatal("a publisher past its deadline was never answered")
			}
		})
	}
}
