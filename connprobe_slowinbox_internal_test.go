//go:build connprobe

package pubsub

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// gateHook blocks the node's inbox goroutine on the first MailboxFull of
// topic: a slow HandledHook, which README says delays every delivery.
type gateHook struct {
	topic   string
	once    sync.Once
	entered chan struct{}
	gate    chan struct{}
}

func (h *gateHook) OnHandled(i HandledInfo) {
	if i.Topic != h.topic || i.Status != MailboxFull {
		return
	}
	h.once.Do(func() {
		close(h.entered)
		<-h.gate
	})
}

type probeRec struct {
	mu  sync.Mutex
	got map[string]map[string]int // subscriber local -> message -> times
}

func (r *probeRec) handler(ctx context.Context, m *Message) error {
	id, _ := SubscriberFromContext(ctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got[id.Local] == nil {
		r.got[id.Local] = map[string]int{}
	}
	r.got[id.Local][string(m.Data)]++
	return nil
}

func (r *probeRec) times(local, msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got[local][msg]
}

// Probe: the subscriber node's inbox overflows as a NATS slow consumer
// while deliveries of at-most-once, at-least-once and group topics arrive.
func TestProbeSlowConsumerInboxAcksStayHonest(t *testing.T) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	opts := []Option{WithHeartbeatInterval(50 * time.Millisecond), WithMemberTimeout(2 * time.Second),
		WithRequestTimeout(3 * time.Second), WithSubscriberTimeout(2 * time.Second),
		WithDeliveryMode(func(topic string) DeliveryMode {
			if strings.HasPrefix(topic, "alo") {
				return AtLeastOnce
			}
			return AtMostOnce
		})}
	o := joinWithForTest(t, s.ClientURL(), "o", opts...)
	hook := &gateHook{entered: make(chan struct{}), gate: make(chan struct{})}
	var gateOnce sync.Once
	openGate := func() { gateOnce.Do(func() { close(hook.gate) }) }
	t.Cleanup(openGate)
	sn := joinWithForTest(t, s.ClientURL(), "s", append(opts, WithHooks(hook))...)
	waitForTest(t, "views", func() bool { return len(o.view().members) == 2 && len(sn.view().members) == 2 })

	tb := ownedTopics(o, "o", "block", 1)[0]
	t1 := ownedTopics(o, "o", "amo", 1)[0]
	t2 := ownedTopics(o, "o", "alo", 1)[0]
	t3 := ownedTopics(o, "o", "alogroup", 1)[0]
	t4 := ownedTopics(o, "o", "amogroup", 1)[0]
	hook.topic = tb

	blocked := make(chan struct{})
	var blockOnce sync.Once
	release := func() { blockOnce.Do(func() { close(blocked) }) }
	t.Cleanup(release)
	ctx := t.Context()
	_, err = sn.Subscribe(ctx, tb, func(ctx context.Context, _ *Message) error {
		select {
		case <-blocked:
		case <-ctx.Done():
		}
		return nil
	}, WithSubscriptionMailbox(1))
	require.NoError(t, err)

	rec := &probeRec{got: map[string]map[string]int{}}
	subs := map[string][]*Subscription{}
	sub := func(n *Node, topic string, o ...SubscribeOption) {
		sb, err := n.Subscribe(ctx, topic, rec.handler, o...)
		require.NoError(t, err)
		subs[topic] = append(subs[topic], sb)
	}
	sub(sn, t1)
	sub(o, t1)
	sub(sn, t2)
	sub(sn, t3, WithGroup("g"))
	sub(o, t3, WithGroup("g"))
	sub(sn, t4, WithGroup("g"))
	sub(o, t4, WithGroup("g"))

	require.NoError(t, sn.life.inboxSub.SetPendingLimits(4, 1<<20))

	// Block the inbox: the first batch runs (blocked), the second waits in
	// the mailbox, the third is MailboxFull and its hook blocks the inbox.
	for i := range 3 {
		_, err := o.PublishMessages(ctx, tb, []Outgoing{{Data: []byte(fmt.Sprint(i))}}, WithAck(AckAccepted))
		require.NoError(t, err)
	}
	select {
	case <-hook.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the inbox was not blocked by the hook")
	}

	type result struct {
		topic, msg string
		ack        PublishAck
		err        error
	}
	const per = 12
	results := make(chan result, 4*per)
	var wg sync.WaitGroup
	for _, topic := range []string{t1, t2, t3, t4} {
		for i := range per {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m := fmt.Sprintf("%s-%d", topic, i)
				ack, err := o.Publish(ctx, topic, []byte(m))
				results <- result{topic, m, ack, err}
			}()
		}
	}
	waitForTest(t, "inbox drops", func() bool { d, _ := sn.life.inboxSub.Dropped(); return d > 0 })
	dropped, _ := sn.life.inboxSub.Dropped()
	t.Logf("dropped %d while blocked", dropped)
	time.Sleep(300 * time.Millisecond) // probe: hold the block a little (below SubscriberTimeout)
	openGate()
	release()
	wg.Wait()
	close(results)

	waitForTest(t, "InboxDropped in stats", func() bool { return sn.Stats().InboxDropped > 0 })
	stat := map[string]map[string]int{}
	for r := range results {
		if stat[r.topic] == nil {
			stat[r.topic] = map[string]int{}
		}
		if r.err != nil {
			stat[r.topic]["err:"+r.ack.Reason.String()]++
			continue
		}
		failed := map[string]DeliveryStatus{}
		for _, f := range r.ack.Failures {
			if f.Subscriber.Node != "" {
				failed[f.Subscriber.Local] = f.Status
				stat[r.topic]["fail:"+f.Subscriber.Node+":"+f.Status.String()]++
			} else {
				stat[r.topic]["groupfail:"+f.Status.String()]++
			}
		}
		switch r.topic {
		case t1, t2:
			for _, sb := range subs[r.topic] {
				if _, bad := failed[sb.ID().Local]; !bad {
					// counted delivered: it must have run
					assert.Equal(t, 1, rec.times(sb.ID().Local, r.msg), "%s counted delivered to %s (ack %+v) but ran %d times", r.msg, sb.ID(), r.ack, rec.times(sb.ID().Local, r.msg))
				}
			}
			wantDelivered := len(subs[r.topic]) - len(failed)
			assert.Equal(t, wantDelivered, r.ack.Delivered, "ack %+v", r.ack)
		case t3, t4:
			runs := 0
			for _, sb := range subs[r.topic] {
				runs += rec.times(sb.ID().Local, r.msg)
			}
			if r.ack.Delivered == 1 {
				assert.GreaterOrEqual(t, runs, 1, "%s: group counted delivered but no member ran it (ack %+v)", r.msg, r.ack)
			}
			if r.topic == t4 {
				assert.LessOrEqual(t, runs, 1, "%s: at-most-once group ran it %d times", r.msg, runs)
			}
		}
		if r.topic == t2 || r.topic == t1 {
			for _, sb := range subs[r.topic] {
				assert.LessOrEqual(t, rec.times(sb.ID().Local, r.msg), 1, "%s ran twice at %s", r.msg, sb.ID())
			}
		}
	}
	for _, topic := range []string{t1, t2, t3, t4} {
		t.Logf("%s: %v", topic, stat[topic])
	}
	// Heal: every live subscription receives again.
	for _, topic := range []string{t1, t2, t3, t4} {
		want := len(subs[topic])
		if topic == t3 || topic == t4 {
			want = 1
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			ack, err := o.Publish(ctx, topic, []byte("after-"+topic))
			if err == nil && ack.Delivered == want && len(ack.Failures) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not serve every subscriber after the heal: ack %+v err %v", topic, ack, err)
			}
		}
	}
	for topic, ss := range subs {
		for _, sb := range ss {
			select {
			case <-sb.Done():
				t.Errorf("%s on %s ended: %v", sb.ID(), topic, sb.Err())
			default:
			}
		}
	}
}
