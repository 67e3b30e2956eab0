package pubsub

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

func joinForTest(t *testing.T, url, id string, heartbeat time.Duration) *Node {
	t.Helper()
	return joinWithForTest(t, url, id, WithHeartbeatInterval(heartbeat),
		WithMemberTimeout(2*time.Second), WithRequestTimeout(3*time.Second), WithSubscriberTimeout(2*time.Second))
}

func waitForTest(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond) // polling interval
	}
}

// Found in review: collectIdleActors could mark an actor dead while refreshTopics has
// already queued a reconcile on it (it looked the actor up before the
// collection ran). reconcile does not check dead: the dead actor takes the
// topic's pulled subscribers out of the registry, and the successor actor
// becomes ready with none of them. Here a forged LEAVE makes owner a drop
// member b (its only subscriber node), b's next heartbeat re-adds it and a
// pulls b's subscription; b never changed its own view, so it pushes nothing.
func TestCollectedActorDoesNotSwallowPulledSubscribers(t *testing.T) {
	leakcheck.Parallel(t)
	s, err := embedded.StartServer()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	a := joinForTest(t, s.ClientURL(), "a", 50*time.Millisecond)
	// b heartbeats slowly, so a has time to act on the forged LEAVE before
	// b's next heartbeat re-adds it (else the two view changes coalesce and
	// the actor never sees b gone).
	b := joinForTest(t, s.ClientURL(), "b", 400*time.Millisecond)
	waitForTest(t, "views", func() bool { return len(a.view().members) == 2 && len(b.view().members) == 2 })
	topic := ownedTopics(a, "a", "t", 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got := make(chan string, 16)
	if _, err := b.Subscribe(ctx, topic, func(_ context.Context, m *Message) error { got <- string(m.Data); return nil }); err != nil {
		t.Fatal(err)
	}
	ack, err := a.Publish(ctx, topic, []byte("before"))
	t.Logf("before: ack=%+v err=%v", ack, err)

	act := a.owner.actor(topic)
	// A forged LEAVE with b's real incarnation, seen by a only in effect.
	env := &wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{Kind: wire.Heartbeat_LEAVE, From: b.selfRef()}}}
	data, _ := proto.Marshal(env)
	forger, _ := nats.Connect(s.ClientURL())
	defer forger.Close()
	_ = forger.Publish(a.members.subject, data)
	_ = forger.Flush()
	waitForTest(t, "a drops b's subscriber", func() bool { return act.count.Load() == 0 })

	// Hold the actor so the collector's check and the registry's reconcile
	// queue in the order they can also meet in by chance.
	release := make(chan struct{})
	act.s.do(func() { act.used = time.Time{}; <-release })
	a.owner.collectIdleActors(0)
	waitForTest(t, "a re-adds b and pulls its subscriptions", func() bool {
		a.owner.registry.mu.Lock()
		defer a.owner.registry.mu.Unlock()
		return len(a.owner.registry.view.members) == 2 && a.owner.registry.complete
	})
	waitForTest(t, "refreshTopics queues its reconcile behind the collector", func() bool { return act.s.depth() >= 2 })
	close(release)
	deadline := time.Now().Add(2 * time.Second)
	for {
		ack, err = a.Publish(ctx, topic, []byte("after"))
		if err == nil && ack.Delivered == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("live subscriber on b left out of topic %s: ack %+v err %v; b's view %d members (never changed)", topic, ack, err, len(b.view().members))
		}
	}
}

// Found in review: a second copy of a batch (at-least-once re-send that bypasses the
// node's duplicate memory, e.g. when n.subscriber.recent holds maxRecentBatches) is
// reported Delivered because lastBatch was set before the first copy's
// handler ran, even though that handler failed: the ack over-claims.
func TestDuplicateCopyReportsTheFirstCopysOutcome(t *testing.T) {
	s, err := embedded.StartServer()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	a := joinForTest(t, s.ClientURL(), "a", 50*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var calls atomic.Int32
	sub, err := a.Subscribe(ctx, "t", func(context.Context, *Message) error { calls.Add(1); return fmt.Errorf("boom") })
	if err != nil {
		t.Fatal(err)
	}
	msgs := payload{msgs: msgBatch{data: [][]byte{[]byte("x")}}, seq: batchSeq{owner: "o", inc: 1, seq: 42}}
	for copyNo := 1; copyNo <= 2; copyNo++ {
		done := make(chan []DeliveryStatus, 1)
		a.deliver("t", []string{sub.ID().Local}, nil, msgs, func(st []DeliveryStatus, _, _ []uint32) { done <- st })
		st := <-done
		if st[0] != HandlerError || calls.Load() != 1 {
			t.Fatalf("copy %d: status %v after %d handler runs, want handler-error after 1", copyNo, st[0], calls.Load())
		}
	}
}
