package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// On an AtLeastOnce topic a group member whose node crashes while it holds
// its share is re-routed (README, guarantee 3: the owner re-sends until the
// subscriber timeout plus a quarter of RequestTimeout, "then a consumer
// group's share goes to another member"). The owner learns of the crash
// either as a Timeout (resends ran out) or as SubscriberGone (the node left
// the view first). Both must re-route: a MemberTimeout shorter than the
// resend window (here 2.5 s < 2 s + 3 s / 4) made the share SubscriberGone
// just past SubscriberTimeout after acceptance, which re-routes only within
// SubscriberTimeout, so no live member ever ran it, while a longer
// MemberTimeout (a Timeout first) would have re-routed it.
func TestGroupAtLeastOnceMemberCrashLeavingTheViewIsRerouted(t *testing.T) {
	leakcheck.Parallel(t)
	for _, mt := range []time.Duration{2500 * time.Millisecond, 4 * time.Second} {
		t.Run(fmt.Sprintf("member-timeout-%v", mt), func(t *testing.T) { groupCrashReroute(t, mt) })
	}
}

func groupCrashReroute(t *testing.T, memberTimeout time.Duration) {
	c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(atLeastOnce), pubsub.WithMemberTimeout(memberTimeout),
		pubsub.WithSubscriberTimeout(2*time.Second), pubsub.WithRequestTimeout(3*time.Second))
	topic := ownedBy(t, c.Nodes[0], "alo-crash")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	started := make(chan struct{}, 1)
	var mu sync.Mutex
	ran := map[string]int{}
	_, err := c.Nodes[1].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		select {
		case started <- struct{}{}:
		default:
		}
		<-release // the node crashes while its member holds the share
		return fmt.Errorf("not run")
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Nodes[2].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		mu.Lock()
		ran[string(m.Data)]++
		mu.Unlock()
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	const total = 20
	var out []pubsub.Outgoing
	for i := range total {
		out = append(out, pubsub.Outgoing{Data: msg(i), Key: fmt.Sprintf("key-%d", i)})
	}
	type result struct {
		ack pubsub.PublishAck
		err error
	}
	done := make(chan result, 1)
	go func() {
		ack, err := c.Nodes[0].PublishMessages(context.Background(), topic, out)
		done <- result{ack, err}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("n1's member got no share")
	}
	c.Crash(1)
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second): // the publish's own wait is about 6 s
		t.Fatal("the publish never returned")
	}
	t.Logf("ack %+v err %v", r.ack, r.err)
	if r.err != nil {
		t.Fatalf("publish: %v", r.err)
	}
	mu.Lock()
	defer mu.Unlock()
	var missing []string
	for i := range total {
		if ran[string(msg(i))] == 0 {
			missing = append(missing, string(msg(i)))
		}
	}
	if len(missing) > 0 || r.ack.Delivered != 1 {
		t.Fatalf("at-least-once group: %d of %d messages run by no live member (%v), ack %+v", len(missing), total, missing, r.ack)
	}
}
