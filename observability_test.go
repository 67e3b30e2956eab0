package pubsub_test

// The observability surface checked against what happened: events, Stats
// and hooks against the acks under failures; listeners churning through
// Close; TopicStats when the owner crashes; rejections through an owner
// crash. (Written as a probe by a helper session; all passed.)

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// outcomeKey is one subscriber's outcome of one batch.
type outcomeKey struct {
	sub    pubsub.SubscriberID
	status pubsub.DeliveryStatus
}

func sortedKeys(m map[outcomeKey]int) []string {
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%s/%s x%d", k.sub, k.status, v))
	}
	sort.Strings(out)
	return out
}

// TestEventsStatsAndHooksMatchAcksUnderFailures publishes through a
// subscriber set with a good, a failing, a panicking and a blocked
// subscriber (remote and local to the owner), then checks that the
// owner's events, the owner's Stats deltas and the subscribers' hooks all
// agree with the acks the publisher got.
func TestEventsStatsAndHooksMatchAcksUnderFailures(t *testing.T) {
	c := newCluster(t, 3, 0)
	recs := make([]*hookRecorder, 3)
	for i := range recs {
		recs[i] = &hookRecorder{}
		c.AddNode(t, "n"+string(rune('0'+i)), i, append(append([]pubsub.Option{}, fast...),
			pubsub.WithSubscriberTimeout(400*time.Millisecond), pubsub.WithEvictAfter(3), pubsub.WithHooks(recs[i]))...)
	}
	c.WaitConverged(t, 10*time.Second)
	ctx := ctxT(t)
	owner, subNode, pubNode := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	topic := ownedBy(t, owner, "probe-ev")
	ownerLog, subLog, pubLog := watch(t, owner), watch(t, subNode), watch(t, pubNode)

	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	good := subscribe(t, subNode, topic, newRecorder().handler)
	failing := subscribe(t, subNode, topic, func(context.Context, *pubsub.Message) error { return errors.New("no") })
	panicking := subscribe(t, owner, topic, func(context.Context, *pubsub.Message) error { panic("boom") })
	blocked, err := subNode.Subscribe(ctx, topic, func(ctx context.Context, m *pubsub.Message) error {
		<-release
		return nil
	}, pubsub.WithSubscriptionMailbox(1))
	if err != nil {
		t.Fatal(err)
	}
	_ = good
	before := owner.Stats()
	pubBefore := pubNode.Stats()

	const publishes = 8
	ackFail := map[outcomeKey]int{}
	delivered, failures := 0, 0
	for i := 0; i < publishes; i++ {
		ack, err := pubNode.PublishBatch(ctx, topic, [][]byte{msg(2 * i), msg(2*i + 1)})
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		delivered += ack.Delivered
		for _, f := range ack.Failures {
			ackFail[outcomeKey{f.Subscriber, f.Status}]++
			failures++
		}
	}
	releaseOnce.Do(func() { close(release) })

	// The owner: one PublishAccepted per publish, its counts, DeliveryFailed
	// per failure.
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		ownerLog.mu.Lock()
		defer ownerLog.mu.Unlock()
		n := 0
		for _, e := range ownerLog.events {
			if a, ok := e.(pubsub.PublishAccepted); ok && a.Topic == topic {
				n++
			}
		}
		return n >= publishes
	}, "PublishAccepted events")
	// Let evictions' events and notices land (they are queued before the answer).
	evictedIDs := map[pubsub.SubscriberID]bool{}
	for _, s := range []*pubsub.Subscription{failing, panicking, blocked} {
		select {
		case <-s.Done():
			evictedIDs[s.ID()] = true
		case <-time.After(5 * time.Second):
			t.Errorf("%s not evicted: %v", s.ID(), s.Err())
		}
	}

	ownerLog.mu.Lock()
	evFail := map[outcomeKey]int{}
	accepted, accDelivered, accFailed, succeeded, succMsgs := 0, 0, 0, 0, 0
	ownerEvicted := map[pubsub.SubscriberID]int{}
	for _, e := range ownerLog.events {
		switch e := e.(type) {
		case pubsub.PublishAccepted:
			if e.Topic == topic {
				accepted++
				accDelivered += e.Delivered
				accFailed += e.Failed
				if e.Messages != 2 {
					t.Errorf("PublishAccepted.Messages = %d, want 2", e.Messages)
				}
			}
		case pubsub.DeliverySucceeded:
			succeeded += e.Subscribers
			succMsgs += e.Messages
		case pubsub.DeliveryFailed:
			evFail[outcomeKey{e.Subscriber, e.Status}]++
		case pubsub.SubscriberEvicted:
			ownerEvicted[e.Subscriber]++
		case pubsub.EventsDropped:
			t.Errorf("owner listener dropped events: %+v", e)
		}
	}
	ownerLog.mu.Unlock()
	t.Logf("ack failures: %v; delivered %d", sortedKeys(ackFail), delivered)
	if accepted != publishes || accDelivered != delivered || accFailed != failures || succeeded != delivered {
		t.Errorf("owner events: %d accepted, %d delivered, %d failed, DeliverySucceeded %d; acks: %d publishes, %d delivered, %d failures",
			accepted, accDelivered, accFailed, succeeded, publishes, delivered, failures)
	}
	if fmt.Sprint(sortedKeys(evFail)) != fmt.Sprint(sortedKeys(ackFail)) {
		t.Errorf("DeliveryFailed events %v\n != ack failures %v", sortedKeys(evFail), sortedKeys(ackFail))
	}
	for id := range evictedIDs {
		if ownerEvicted[id] != 1 {
			t.Errorf("owner emitted %d SubscriberEvicted for %s, want 1", ownerEvicted[id], id)
		}
	}
	// The subscriber's node emits it too, once, for its remote ones.
	subLog.mu.Lock()
	subEvicted := map[pubsub.SubscriberID]int{}
	for _, e := range subLog.events {
		if e, ok := e.(pubsub.SubscriberEvicted); ok {
			subEvicted[e.Subscriber]++
		}
	}
	subLog.mu.Unlock()
	for _, s := range []*pubsub.Subscription{failing, blocked} {
		if subEvicted[s.ID()] != 1 {
			t.Errorf("subscriber's node emitted %d SubscriberEvicted for %s, want 1", subEvicted[s.ID()], s.ID())
		}
	}

	// Stats on the owner.
	after := owner.Stats()
	if d := after.MessagesPublished - before.MessagesPublished; d != 2*publishes {
		t.Errorf("MessagesPublished delta %d, want %d", d, 2*publishes)
	}
	if d := after.Deliveries - before.Deliveries; d != uint64(delivered) {
		t.Errorf("Deliveries delta %d, want %d", d, delivered)
	}
	if d := after.DeliveryFailures - before.DeliveryFailures; d != uint64(failures) {
		t.Errorf("DeliveryFailures delta %d, want %d", d, failures)
	}
	if d := after.Evictions - before.Evictions; d != uint64(len(evictedIDs)) {
		t.Errorf("Evictions delta %d, want %d", d, len(evictedIDs))
	}
	if d := pubNode.Stats().Rejected - pubBefore.Rejected; d != 0 {
		t.Errorf("publisher Rejected delta %d, want 0", d)
	}
	pubLog.mu.Lock()
	for _, e := range pubLog.events {
		if _, ok := e.(pubsub.PublishRejected); ok {
			t.Errorf("publisher emitted %+v", e)
		}
	}
	pubLog.mu.Unlock()

	// Hooks: one per subscriber per batch, with the status the ack lists.
	want := map[outcomeKey]int{}
	for k, v := range ackFail {
		want[k] = v
	}
	want[outcomeKey{good.ID(), pubsub.Delivered}] = publishes
	total := 0
	for _, v := range want {
		total += v
	}
	got := map[outcomeKey]int{}
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		got = map[outcomeKey]int{}
		n := 0
		for _, r := range recs {
			for _, h := range r.handles() {
				if h.Topic == topic {
					got[outcomeKey{h.Subscriber, h.Status}]++
					n++
				}
			}
		}
		return n >= total
	}, "handled hooks")
	if fmt.Sprint(sortedKeys(got)) != fmt.Sprint(sortedKeys(want)) {
		t.Errorf("handled hooks %v\n != acks %v", sortedKeys(got), sortedKeys(want))
	}
	// Publish hooks: one per call on the publisher, none elsewhere.
	if n := len(recs[2].publishes()); n != publishes {
		t.Errorf("publish hooks on the publisher: %d, want %d", n, publishes)
	}
}

// TestListenersChurnThroughClose subscribes and cancels listeners
// while a node publishes, and while it closes: nothing panics, a cancel
// after Close returns, a Subscribe after Close is a no-op, a listener
// stuck at Close does not hold Close up, and every listener still
// subscribed at Close gets its buffered events and then ends.
func TestListenersChurnThroughClose(t *testing.T) {
	c := newCluster(t, 1, 2)
	n := c.Nodes[1]
	topic := ownedBy(t, n, "churn")
	subscribe(t, n, topic, newRecorder().handler)
	ctx := ctxT(t)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var stopOnce sync.Once
	stopAll := func() { stopOnce.Do(func() { close(stop) }); wg.Wait() }
	defer stopAll() // also when the test fails early
	// Publishers.
	for p := 0; p < 2; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := n.Publish(ctx, topic, msg(i)); errors.Is(err, pubsub.ErrClosed) {
					return
				}
			}
		}()
	}
	// Listener churn.
	var leftover []func()
	var mu sync.Mutex
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				cancel := n.Events().Subscribe(func(pubsub.Event) {})
				if i%3 == 0 {
					mu.Lock()
					leftover = append(leftover, cancel) // cancelled after Close
					mu.Unlock()
					continue
				}
				cancel()
				cancel() // twice is fine
			}
		}(g)
	}
	// A listener stuck in fn at Close.
	stuck := make(chan struct{})
	var unstickOnce sync.Once
	unstick := func() { unstickOnce.Do(func() { close(stuck) }) }
	defer unstick()
	entered := make(chan struct{})
	var once sync.Once
	stuckCancel := n.Events().Subscribe(func(pubsub.Event) {
		once.Do(func() { close(entered) })
		<-stuck
	})
	<-entered
	// A counting listener: it must get events up to Close, then end.
	var counted atomic.Int64
	countDone := make(chan struct{})
	countCancel := n.Events().Subscribe(func(pubsub.Event) { counted.Add(1) })
	go func() { <-stop; close(countDone) }()

	testcluster.WaitFor(t, 5*time.Second, func() bool { return n.Stats().Deliveries > 200 }, "publishes flowing")
	closeCtx, cancelClose := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelClose()
	start := time.Now()
	if err := n.Close(closeCtx); err != nil {
		t.Errorf("Close: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v with a stuck listener", d)
	}
	stopAll()
	// After Close: Subscribe is a no-op, cancels return.
	late := n.Events().Subscribe(func(pubsub.Event) { t.Error("event after Close") })
	late()
	done := make(chan struct{})
	go func() {
		mu.Lock()
		for _, cancel := range leftover {
			cancel()
		}
		mu.Unlock()
		countCancel()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel after Close did not return")
	}
	<-countDone
	if counted.Load() == 0 {
		t.Error("counting listener saw nothing")
	}
	unstick()
	stuckCancel()
	t.Logf("%d leftover listeners, counted %d events", len(leftover), counted.Load())
}

// TestTopicStatsWhenTheOwnerCrashes asks a non-owner for TopicStats
// while the owner is dead but still in the view: a short ctx is honoured
// and wrapped, a long one ends with a sentinel within about
// RequestTimeout, and after the move the counts leave the dead node out.
func TestTopicStatsWhenTheOwnerCrashes(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "ts")
	for i := range c.Nodes {
		subscribe(t, c.Nodes[i], topic, newRecorder().handler)
	}
	ts, err := c.Nodes[1].TopicStats(ctxT(t), topic)
	if err != nil || ts.Total != 3 || ts.Owner != c.Nodes[0].ID() {
		t.Fatalf("TopicStats = %+v, %v", ts, err)
	}
	c.Crash(0)

	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.Nodes[1].TopicStats(short, topic)
	took := time.Since(start)
	t.Logf("short ctx: %v after %v", err, took)
	if err == nil {
		t.Errorf("TopicStats of a crashed owner's topic succeeded")
	} else if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("short ctx: %v does not wrap context.DeadlineExceeded", err)
	}
	if took > time.Second {
		t.Errorf("short ctx honoured only after %v", took)
	}
	cctx, ccancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, ccancel) // cancelled while it waits
	start = time.Now()
	_, err = c.Nodes[2].TopicStats(cctx, topic)
	took = time.Since(start)
	t.Logf("cancelled ctx: %v after %v", err, took)
	if err == nil || !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled ctx: %v does not wrap context.Canceled", err)
	}
	if took > time.Second {
		t.Errorf("cancel honoured only after %v", took)
	}

	start = time.Now()
	ts, err = c.Nodes[1].TopicStats(ctxT(t), topic)
	took = time.Since(start)
	t.Logf("long ctx: %+v %v after %v", ts, err, took)
	if err != nil && !errors.Is(err, pubsub.ErrTimeout) && !errors.Is(err, pubsub.ErrTopicUnavailable) {
		t.Errorf("long ctx: %v wraps no sentinel", err)
	}
	if err == nil && ts.Owner == c.Nodes[0].ID() {
		t.Errorf("answered by the crashed owner: %+v", ts)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		ts, err = c.Nodes[1].TopicStats(ctxT(t), topic)
		return err == nil && ts.Owner != c.Nodes[0].ID() && ts.Total == 2 && ts.Subscribers[c.Nodes[0].ID()] == 0
	}, "TopicStats after the move: %+v %v", ts, err)
	// Stats on the new owner agrees.
	for _, i := range []int{1, 2} {
		if c.Nodes[i].ID() == ts.Owner {
			if got := c.Nodes[i].Stats().Subscribers[topic]; got != 2 {
				t.Errorf("owner Stats().Subscribers[%s] = %d, want 2", topic, got)
			}
		}
	}
	// A closed node answers ErrClosed.
	c.CloseNode(t, 2)
	if _, err := c.Nodes[2].TopicStats(ctxT(t), topic); !errors.Is(err, pubsub.ErrClosed) {
		t.Errorf("TopicStats on a closed node: %v", err)
	}
}

// TestRejectionsAddUpThroughAnOwnerCrash: concurrent publishers on
// one node through an owner crash; every rejected call shows up once in
// PublishRejected, Stats.Rejected and the publish hook, with its message
// count, and every call in exactly one hook.
func TestRejectionsAddUpThroughAnOwnerCrash(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 0)
	rec := &hookRecorder{}
	for i := 0; i < 3; i++ {
		opts := append([]pubsub.Option{}, fast...)
		if i == 2 {
			opts = append(opts, pubsub.WithHooks(rec))
		}
		c.AddNode(t, "n"+string(rune('0'+i)), i, opts...)
	}
	c.WaitConverged(t, 10*time.Second)
	pub := c.Nodes[2]
	topic := ownedBy(t, c.Nodes[0], "rej")
	subscribe(t, c.Nodes[1], topic, newRecorder().handler)
	pubLog := watch(t, pub)
	before := pub.Stats().Rejected

	var mu sync.Mutex
	calls, rejectedCalls, rejectedMsgs, acceptedCalls := 0, 0, 0, 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var stopOnce sync.Once
	stopPublishers := func() { stopOnce.Do(func() { close(stop) }); wg.Wait() }
	defer stopPublishers() // also when the test fails early
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				size := 1 + (i+g)%3
				batch := make([][]byte, size)
				for j := range batch {
					batch[j] = msg(i)
				}
				// A deadline shorter than MemberTimeout: calls made while
				// the crashed owner is still in the view are rejected.
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				var err error
				if i%2 == 0 {
					_, err = pub.PublishBatch(ctx, topic, batch)
				} else {
					out := make([]pubsub.Outgoing, size)
					for j := range out {
						out[j] = pubsub.Outgoing{Data: batch[j]}
					}
					_, err = pub.PublishMessages(ctx, topic, out, pubsub.WithAck(pubsub.AckAccepted))
				}
				cancel()
				mu.Lock()
				calls++
				if err != nil {
					rejectedCalls++
					rejectedMsgs += size
				} else {
					acceptedCalls++
				}
				mu.Unlock()
			}
		}(g)
	}
	testcluster.WaitFor(t, 5*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return acceptedCalls > 50 }, "publishing")
	c.Crash(0)
	testcluster.WaitFor(t, 15*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return rejectedCalls > 0 && acceptedCalls > 100
	}, "rejections then acceptance")
	// Accepted again after the move.
	mu.Lock()
	mark := acceptedCalls
	mu.Unlock()
	testcluster.WaitFor(t, 15*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return acceptedCalls > mark+50 }, "serving again")
	stopPublishers()

	evMsgs, evCalls := 0, 0
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		pubLog.mu.Lock()
		defer pubLog.mu.Unlock()
		evMsgs, evCalls = 0, 0
		for _, e := range pubLog.events {
			if r, ok := e.(pubsub.PublishRejected); ok && r.Topic == topic {
				evMsgs += r.Messages
				evCalls++
			}
		}
		return evCalls >= rejectedCalls
	}, "PublishRejected events %d, calls %d", evCalls, rejectedCalls)
	hookErr, hookCalls, hookErrMsgs := 0, 0, 0
	for _, p := range rec.publishes() {
		if p.Topic != topic {
			continue
		}
		hookCalls++
		if p.Err != nil {
			hookErr++
			hookErrMsgs += p.Messages
		}
	}
	t.Logf("calls %d (rejected %d, %d messages); events %d (%d messages); Stats.Rejected delta %d; hooks %d (err %d, %d messages)",
		calls, rejectedCalls, rejectedMsgs, evCalls, evMsgs, pub.Stats().Rejected-before, hookCalls, hookErr, hookErrMsgs)
	if evCalls != rejectedCalls || evMsgs != rejectedMsgs {
		t.Errorf("PublishRejected: %d events, %d messages; calls rejected: %d, %d messages", evCalls, evMsgs, rejectedCalls, rejectedMsgs)
	}
	if d := pub.Stats().Rejected - before; d != uint64(rejectedMsgs) {
		t.Errorf("Stats.Rejected delta %d, want %d", d, rejectedMsgs)
	}
	if hookCalls != calls || hookErr != rejectedCalls || hookErrMsgs != rejectedMsgs {
		t.Errorf("hooks: %d calls, %d errors (%d messages); want %d, %d (%d)", hookCalls, hookErr, hookErrMsgs, calls, rejectedCalls, rejectedMsgs)
	}
}
