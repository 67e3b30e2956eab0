package pubsub_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// The replay rule (reroutes.reroutable) keeps a retried batch's
// SubscriberGone from a group member that may have run its share the first
// time from being re-routed, unless the report is "partial": a
// subscription that ran part of this very copy. But partial is read from
// the node's report as a whole (processed != nil), not per subscriber: a
// broadcast subscriber on the member's node that is new since the first
// attempt, and ends partway through the retry's copy, makes the member's
// own plain SubscriberGone look partial, and the member's whole share (run
// in the first attempt) is re-routed and runs twice on an at-most-once
// topic.
func TestGroupRetryMemberGoneIsNotReroutedByANeighboursPartialReport(t *testing.T) {
	runs := &memberRuns{ran: map[string][]string{}}
	handled := &handledCounter{}
	unsubA := make(chan error, 1)
	unsubQ := make(chan error, 1)
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...), handled.hook(), pubsub.WithSilentWaitForTest())...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[1], "partial-neighbour")

	var qSub atomic.Pointer[pubsub.Subscription]
	qEnded := make(chan struct{})
	qHandler := func(_ context.Context, m *pubsub.Message) error {
		s := qSub.Load()
		select {
		case <-s.Done():
			return nil
		default:
		}
		go func() { unsubQ <- s.Unsubscribe(ctxT(t)) }()
		<-s.Done() // ends after its first message of the batch
		close(qEnded)
		return nil
	}
	var aSub atomic.Pointer[pubsub.Subscription]
	var calls atomic.Int32
	a, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
		runs.record("A", m)
		switch calls.Add(1) {
		case 1:
			// Q, a broadcast subscriber on A's node, joins after the
			// first attempt was assigned: it gets only the retry.
			q, err := c.Nodes[2].Subscribe(ctxT(t), topic, qHandler)
			if err != nil {
				t.Error(err)
				return nil
			}
			qSub.Store(q)
		case 2:
			c.Client(2).Stall(faultnet.Forward)
			s := aSub.Load()
			go func() { unsubA <- s.Unsubscribe(ctxT(t)) }()
			<-s.Done()
		}
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	aSub.Store(a)
	id := a.ID()
	handled.id.Store(&id)
	for _, k := range []int{0, 1} {
		name := map[int]string{0: "B", 1: "C"}[k]
		if _, err := c.Nodes[k].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
			runs.record(name, m)
			return nil
		}, pubsub.WithGroup("g")); err != nil {
			t.Fatal(err)
		}
	}

	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	const total = 6
	var futs []*pubsub.Produced
	for i := range total {
		futs = append(futs, p.Produce(ctxT(t), msg(i)))
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush(ctxT(t)) }()

	testcluster.WaitFor(t, 10*time.Second, func() bool { return handled.count() >= 2 },
		"n2 never handled a retry of the batch for A (handled: %v, retries %d)", handled.statuses(), retries.Load())
	select {
	case <-qEnded:
	case <-time.After(10 * time.Second):
		t.Fatal("Q never ran the retry's copy")
	}
	c.HealAll()
	<-unsubA
	<-unsubQ
	ack, err := futs[0].Wait(ctxT(t))
	if ferr := <-flushed; ferr != nil {
		t.Logf("flush: %v", ferr)
	}
	t.Logf("ack %+v err %v; %d retries; A handled %v", ack, err, retries.Load(), handled.statuses())
	var dup []string
	for i := range total {
		if at := runs.of(string(msg(i))); len(at) > 1 {
			dup = append(dup, fmt.Sprintf("%s:%v", msg(i), at))
		}
	}
	if len(dup) > 0 {
		t.Errorf("at-most-once topic: the group ran messages twice: %v", dup)
	}
}
