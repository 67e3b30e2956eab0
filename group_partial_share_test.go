package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// handledFunc is a HandledHook.
type handledFunc func(pubsub.HandledInfo)

func (f handledFunc) OnHandled(i pubsub.HandledInfo) { f(i) }

// handledCounter counts the OnHandled calls for one subscriber (set once
// it is known), on any node.
type handledCounter struct {
	id    atomic.Pointer[pubsub.SubscriberID]
	mu    sync.Mutex
	calls []pubsub.DeliveryStatus
}

func (h *handledCounter) hook() pubsub.Option {
	return pubsub.WithHooks(handledFunc(func(i pubsub.HandledInfo) {
		if id := h.id.Load(); id != nil && *id == i.Subscriber {
			h.mu.Lock()
			h.calls = append(h.calls, i.Status)
			h.mu.Unlock()
		}
	}))
}

func (h *handledCounter) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.calls)
}

func (h *handledCounter) statuses() []pubsub.DeliveryStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]pubsub.DeliveryStatus(nil), h.calls...)
}

// partialShareRig is a faulty 3-server cluster, one node per server, a
// topic owned by n1 and a group "g" with one member per node: A on n2,
// B on n0, C on n1. A's handler, at its trigger-th message, stalls n2's
// connection towards its server (so what n2 sends, its Unsubscribe and
// its reports, is held, not lost) and unsubscribes A: the subscription
// ends locally at once, while the owner still lists A.
type partialShareRig struct {
	c       *testcluster.Cluster
	topic   string
	runs    *memberRuns
	handled *handledCounter // OnHandled calls for A
	unsub   chan error      // A's Unsubscribe's result
	a       atomic.Pointer[pubsub.Subscription]
}

func newPartialShareRig(t *testing.T, prefix string, trigger int32) *partialShareRig {
	r := &partialShareRig{runs: &memberRuns{ran: map[string][]string{}}, handled: &handledCounter{}, unsub: make(chan error, 1)}
	r.c = testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...), r.handled.hook(), pubsub.WithSilentWaitForTest())...)
	r.c.WaitConverged(t, 10*time.Second)
	r.topic = ownedBy(t, r.c.Nodes[1], prefix)
	var calls atomic.Int32
	a, err := r.c.Nodes[2].Subscribe(ctxT(t), r.topic, func(_ context.Context, m *pubsub.Message) error {
		r.runs.record("A", m)
		if calls.Add(1) == trigger {
			r.c.Client(2).Stall(faultnet.Forward)
			s := r.a.Load()
			go func() { r.unsub <- s.Unsubscribe(ctxT(t)) }()
			<-s.Done() // ended locally; the owner is told once the stall ends
		}
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	r.a.Store(a)
	id := a.ID()
	r.handled.id.Store(&id)
	for _, k := range []int{0, 1} {
		name := map[int]string{0: "B", 1: "C"}[k]
		_, err := r.c.Nodes[k].Subscribe(ctxT(t), r.topic, func(_ context.Context, m *pubsub.Message) error {
			r.runs.record(name, m)
			return nil
		}, pubsub.WithGroup("g"))
		if err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// A group member whose subscription ends partway through its share
// (Unsubscribe while the share runs) reports SubscriberGone with how many
// messages it ran, and only the rest goes to another member. But the
// producer's attempt timed out meanwhile (the member's node's report was
// held up), and its retry through the same owner, which still lists the
// member (its Unsubscribe is held up the same way), is assigned as the
// first attempt was: the member's node answers the copy SubscriberGone
// without processed (the subscription is gone), and the owner re-routes
// the member's WHOLE share as surely unprocessed. On an at-most-once topic
// the message the member ran runs again at another member (and so does
// the rest, already re-routed once).
func TestGroupMemberEndedPartwayThroughItsShareIsNotRunTwiceByARetry(t *testing.T) {
	groupEndedMemberRetry(t, "partial-share", 1)
}

// The same when the member ran its whole share before its subscription
// ended (INTERNALS, Known limits, names this case): the retry's
// SubscriberGone re-routes the share, and the group runs it twice.
func TestGroupMemberEndedAfterItsShareIsNotRunTwiceByARetry(t *testing.T) {
	groupEndedMemberRetry(t, "whole-share", 2)
}

func groupEndedMemberRetry(t *testing.T, prefix string, trigger int32) {
	r := newPartialShareRig(t, prefix, trigger)
	c := r.c
	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], r.topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	const total = 6 // keyless: two messages for each member
	var futs []*pubsub.Produced
	for i := range total {
		futs = append(futs, p.Produce(ctxT(t), msg(i)))
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush(ctxT(t)) }()

	// n2 handled A's share of the first attempt, then a retry's copy of it
	// (A gone by then); both answers are held by the stall.
	testcluster.WaitFor(t, 10*time.Second, func() bool { return r.handled.count() >= 2 },
		"n2 never handled a retry of the batch for A (handled: %v, retries %d)", r.handled.statuses(), retries.Load())
	c.HealAll()
	if err := <-r.unsub; err != nil {
		t.Logf("A's unsubscribe: %v", err)
	}
	ack, err := futs[0].Wait(ctxT(t))
	if ferr := <-flushed; ferr != nil {
		t.Logf("flush: %v", ferr)
	}
	t.Logf("ack %+v err %v; %d retries; A handled %v", ack, err, retries.Load(), r.handled.statuses())
	groupFailed := false
	for _, f := range ack.Failures {
		if f.Group == "g" {
			groupFailed = true
		}
	}
	var dup, missing []string
	for i := range total {
		switch at := r.runs.of(string(msg(i))); {
		case len(at) > 1:
			dup = append(dup, fmt.Sprintf("%s:%v", msg(i), at))
		case len(at) == 0:
			missing = append(missing, string(msg(i)))
		}
	}
	if len(dup) > 0 {
		t.Errorf("at-most-once topic: the group ran messages twice: %v", dup)
	}
	if err == nil && !groupFailed && len(missing) > 0 {
		t.Errorf("ack %+v counts the group delivered, but no member ran %v", ack, missing)
	}
}

// A member whose Unsubscribe is on its way to the owner (held up by a
// stall of its node's connection) is assigned a share of a new batch: its
// node answers SubscriberGone (it never ran any of it), and the owner
// re-routes the share. Every message runs once, none at the member that
// left, and the ack counts the group delivered with no failure.
func TestGroupShareOfAMemberUnsubscribingIsReroutedOnce(t *testing.T) {
	r := newPartialShareRig(t, "unsub-in-flight", 0) // A never triggers itself
	c := r.c
	c.Client(2).Stall(faultnet.Forward)
	a := r.a.Load()
	go func() { r.unsub <- a.Unsubscribe(ctxT(t)) }()
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		select {
		case <-a.Done():
			return true
		default:
			return false
		}
	}, "A's subscription did not end locally")
	const total = 6
	msgs := make([]pubsub.Outgoing, total)
	for i := range msgs {
		msgs[i] = pubsub.Outgoing{Data: msg(i)}
	}
	type result struct {
		ack pubsub.PublishAck
		err error
	}
	done := make(chan result, 1)
	go func() {
		ack, err := c.Nodes[0].PublishMessages(ctxT(t), r.topic, msgs)
		done <- result{ack, err}
	}()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return r.handled.count() >= 1 },
		"n2 was never given A's share")
	c.HealAll()
	if err := <-r.unsub; err != nil {
		t.Errorf("A's unsubscribe: %v", err)
	}
	res := <-done
	t.Logf("ack %+v err %v; A handled %v", res.ack, res.err, r.handled.statuses())
	mustAccept(t, res.ack, res.err, 1)
	for i := range total {
		if at := r.runs.of(string(msg(i))); len(at) != 1 || at[0] == "A" {
			t.Errorf("%s ran at %v; want once, not at A", msg(i), at)
		}
	}
}
