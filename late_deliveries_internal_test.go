package pubsub

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// inboxGate blocks the inbox goroutine of its node on the first
// SubscriberGone of topic, which deliverWithin reports to HandledHooks on
// the inbox callback (README: a slow HandledHook delays every delivery).
type inboxGate struct {
	topic   string
	once    sync.Once
	entered chan struct{}
	gate    chan struct{}
}

func (h *inboxGate) OnHandled(i HandledInfo) {
	if i.Topic != h.topic || i.Status != SubscriberGone {
		return
	}
	h.once.Do(func() {
		close(h.entered)
		<-h.gate
	})
}

// Found by review (Node.answered keeps the copy now): a publisher's own delivery that sits in its node's
// inbox queue past the owner's wait (SubscriberTimeout + RequestTimeout/2)
// is reported Timeout (outcome unknown). The AckDelivered answer comes back
// on the reply subscription, which is not behind the inbox, and
// Node.answered drops the kept copy because no subscriber is "unreported".
// When the inbox catches up, the delivery finds no copy (NOT_KEPT, to an rpc
// that gave up): the publisher's own subscriber never runs the batch.
// Without copies the same delivery carries its messages and runs late.
// "Only the messages' route changes" (INTERNALS, Kept copies) does not hold.
func TestKeptCopyOutlivesATimeoutAnswer(t *testing.T) {
	for _, c := range []struct {
		mode   DeliveryMode
		copies bool
	}{{AtMostOnce, false}, {AtMostOnce, true}, {AtLeastOnce, false}, {AtLeastOnce, true}} {
		copies := c.copies
		name := fmt.Sprintf("%v/without-copies", c.mode)
		if copies {
			name = fmt.Sprintf("%v/with-copies", c.mode)
		}
		t.Run(name, func(t *testing.T) {
			s, err := embedded.StartServer()
			require.NoError(t, err)
			t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
			opts := []Option{WithHeartbeatInterval(50 * time.Millisecond), WithMemberTimeout(5 * time.Second),
				WithRequestTimeout(time.Second), WithSubscriberTimeout(500 * time.Millisecond),
				WithDeliveryMode(func(string) DeliveryMode { return c.mode })}
			owner := joinWithForTest(t, s.ClientURL(), "owner", opts...)
			hook := &inboxGate{entered: make(chan struct{}), gate: make(chan struct{})}
			var gateOnce sync.Once
			openGate := func() { gateOnce.Do(func() { close(hook.gate) }) }
			t.Cleanup(openGate)
			pub := joinWithForTest(t, s.ClientURL(), "pub", append(opts, WithHooks(hook))...)
			waitForTest(t, "views", func() bool { return len(owner.view().members) == 2 && len(pub.view().members) == 2 })
			if !copies {
				pub.LimitKeptCopiesForTest(0)
			}
			topics := ownedTopics(pub, "owner", "kept-late", 2)
			block, topic := topics[0], topics[1]
			hook.topic = block
			ctx := t.Context()

			var got atomic.Int64
			_, err = pub.Subscribe(ctx, topic, func(context.Context, *Message) error { got.Add(1); return nil })
			require.NoError(t, err)
			// A subscriber of block the owner records and pub then forgets
			// locally: the owner's next delivery of block is SubscriberGone
			// there, whose hook holds pub's inbox goroutine.
			gone, err := pub.Subscribe(ctx, block, func(context.Context, *Message) error { return nil })
			require.NoError(t, err)
			require.NotNil(t, pub.subscriber.remove(gone.id.Local, ""))
			_, err = owner.PublishMessages(ctx, block, []Outgoing{{Data: []byte("block")}}, WithAck(AckAccepted))
			require.NoError(t, err)
			select {
			case <-hook.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("pub's inbox was not held")
			}

			// pub publishes to a topic it subscribes to; the owner's delivery
			// back to pub waits in pub's inbox queue past the owner's wait.
			ack, err := pub.PublishMessages(ctx, topic, []Outgoing{{Data: []byte("m")}}, WithAck(AckDelivered))
			require.NoError(t, err)
			require.Len(t, ack.Failures, 1, "ack %+v", ack)
			require.Equal(t, Timeout, ack.Failures[0].Status, "ack %+v", ack)
			copiesHeld, _ := pub.KeptCopiesForTest()
			t.Logf("ack %+v; copies held after the answer: %d", ack, copiesHeld)

			openGate() // the inbox catches up: the delivery is read now
			if !assert.Eventually(t, func() bool { return got.Load() > 0 }, 5*time.Second, 5*time.Millisecond) {
				st := pub.Stats()
				t.Fatalf("the publisher's own subscriber never ran the batch whose delivery was merely late (KeptCopyHits %d, KeptCopyMisses %d)",
					st.KeptCopyHits, st.KeptCopyMisses)
			}
		})
	}
}

// Found by review (a local re-route runs within answerBy now): reroute.go promises each re-route is "answered
// before the publisher's wait ends" and bounds a remote re-route by
// answerBy (accepted + SubscriberTimeout + 3/4 RequestTimeout), but a
// re-route to a member on the owner's own node goes through n.deliver with
// a full SubscriberTimeout, whenever it starts. On an at-least-once topic
// a remote member's Timeout (its handler stuck) is re-routed at about
// accepted + SubscriberTimeout; a stuck local member then reports at about
// accepted + 2 x SubscriberTimeout, past the publisher's wait
// (SubscriberTimeout + RequestTimeout): the publisher gets ErrTimeout
// (outcome unknown, which a BatchingProducer retries) instead of the ack
// the owner builds a moment later. armEarlyAnswer does not arm (the owner
// expects to answer by SubscriberTimeout + RequestTimeout/2).
func TestLocalRerouteIsAnsweredBeforeThePublishersWait(t *testing.T) {
	// remote: the second member on a third node (the control, which
	// passes); local: on the owner's node.
	for _, where := range []string{"remote", "local"} {
		t.Run(where, func(t *testing.T) {
			s, err := embedded.StartServer()
			require.NoError(t, err)
			t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
			opts := []Option{WithHeartbeatInterval(50 * time.Millisecond), WithMemberTimeout(5 * time.Second),
				WithRequestTimeout(400 * time.Millisecond), WithSubscriberTimeout(time.Second),
				WithDeliveryMode(func(string) DeliveryMode { return AtLeastOnce })}
			owner := joinWithForTest(t, s.ClientURL(), "owner", opts...)
			// "a-sub" sorts before "b-sub" and "owner": round robin gives
			// it the first message.
			sub := joinWithForTest(t, s.ClientURL(), "a-sub", opts...)
			second := owner
			if where == "remote" {
				second = joinWithForTest(t, s.ClientURL(), "b-sub", opts...)
			}
			waitForTest(t, "views", func() bool {
				return len(owner.view().members) == len(second.view().members) && len(sub.view().members) == len(owner.view().members) &&
					len(owner.view().members) >= 2
			})
			topic := ownedTopics(sub, "owner", "reroute-local", 1)[0]
			ctx := t.Context()
			stuck := func(ctx context.Context, _ *Message) error { <-ctx.Done(); return nil }
			_, err = sub.Subscribe(ctx, topic, stuck, WithGroup("g"))
			require.NoError(t, err)
			_, err = second.Subscribe(ctx, topic, stuck, WithGroup("g"))
			require.NoError(t, err)

			start := time.Now()
			ack, err := sub.PublishMessages(ctx, topic, []Outgoing{{Data: []byte("m")}}, WithAck(AckDelivered))
			t.Logf("after %v: ack %+v, err %v", time.Since(start), ack, err)
			require.NoError(t, err, "the owner's answer (both members Timeout) came after the publisher stopped waiting")
		})
	}
}
