//go:build soak

package pubsub_test

// Soaks of a graceful leave (Node.Close) under load, and of
// BatchingProducer.Close while batches are in flight: every future's
// outcome is checked against what the handlers ran (an Accepted ack claims
// no subscriber that did not run the message; a rejection other than
// ReasonTimeout, outcome unknown, is for a message nothing ran), and the
// survivors serve the leaver's topics afterwards. Run with the README's
// soak command.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// runLog records which subscriber ran which message (a group counts as one
// subscriber, "group:<name>").
type runLog struct {
	mu   sync.Mutex
	runs map[string]map[string]int
}

func newRunLog() *runLog { return &runLog{runs: map[string]map[string]int{}} }

func (r *runLog) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	key := string(id.String())
	if g := id.Group(); g != "" {
		key = "group:" + g
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	k := string(m.Data)
	if r.runs[k] == nil {
		r.runs[k] = map[string]int{}
	}
	r.runs[k][key]++
	return nil
}

func (r *runLog) ranOn(data string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.runs[data])
}

type sentMsg struct {
	data string
	f    *pubsub.Produced
}

// streamer produces into one topic until stopped.
type streamer struct {
	p        *pubsub.BatchingProducer
	mu       sync.Mutex
	sent     []sentMsg
	accepted atomic.Int64
	stop     chan struct{}
	done     chan struct{}
}

func retryThenContinue(attempt int, err error) pubsub.ErrorDecision {
	if attempt < 20 {
		return pubsub.RetryBatch(20 * time.Millisecond)
	}
	return pubsub.FailBatchAndContinue
}

func startStreamer(t *testing.T, n *pubsub.Node, topic, tag string) *streamer {
	t.Helper()
	p, err := pubsub.NewBatchingProducer(n, topic, pubsub.ProducerConfig{OnPublishError: retryThenContinue})
	if err != nil {
		t.Fatal(err)
	}
	s := &streamer{p: p, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			default:
			}
			data := fmt.Sprintf("%s-%d", tag, i)
			f := p.Produce(context.Background(), []byte(data))
			s.mu.Lock()
			s.sent = append(s.sent, sentMsg{data, f})
			var back *pubsub.Produced
			if len(s.sent) > 500 {
				back = s.sent[len(s.sent)-500].f
			}
			s.mu.Unlock()
			if back != nil {
				select { // bounded outstanding window
				case <-back.Done():
					if a, _, _ := back.Result(); a.Status == pubsub.Accepted {
						s.accepted.Add(1)
					}
				case <-s.stop:
					return
				}
			}
		}
	}()
	return s
}

// checkHonest waits for every future and checks its outcome against what
// the handlers ran.
func checkHonest(t *testing.T, log *runLog, sent []sentMsg, within time.Duration) map[string]int {
	t.Helper()
	outcomes := map[string]int{}
	deadline := time.Now().Add(within)
	bad := 0
	for _, m := range sent {
		select {
		case <-m.f.Done():
		case <-time.After(time.Until(deadline)):
			t.Fatalf("future of %s never completed", m.data)
		}
		ack, err, _ := m.f.Result()
		ran := log.ranOn(m.data)
		key := ack.Status.String() + "/" + ack.Reason.String()
		outcomes[key]++
		switch {
		case ack.Status == pubsub.Accepted && ran < ack.Delivered:
			bad++
			if bad < 5 {
				t.Errorf("%s: ack Accepted Delivered=%d failures=%v but ran on %d subscribers", m.data, ack.Delivered, ack.Failures, ran)
			}
		case ack.Status == pubsub.Rejected && ack.Reason != pubsub.ReasonTimeout && ran > 0:
			bad++
			if bad < 5 {
				t.Errorf("%s: Rejected %v (%v) but ran on %d subscribers", m.data, ack.Reason, err, ran)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d dishonest outcomes of %d", bad, len(sent))
	}
	return outcomes
}

func ownedTopics(t *testing.T, n *pubsub.Node, prefix string, k int) []string {
	t.Helper()
	var out []string
	for i := 0; i < 10000 && len(out) < k; i++ {
		topic := fmt.Sprintf("%s-%d", prefix, i)
		if m, err := n.OwnerOf(topic); err == nil && m.ID == n.ID() {
			out = append(out, topic)
		}
	}
	if len(out) < k {
		t.Fatalf("only %d topics owned by %s", len(out), n.ID())
	}
	return out
}

type leaveCase struct {
	closeTimeout time.Duration // ctx of the leaver's Close
	doubleClose  bool          // a second Close races the first
	fault        func(c *testcluster.Cluster)
	deepQueue    int // messages the leaver's own producer has queued
}

// runLeaveUnderLoad: n0 owns topics that producers on n1 and n2 stream
// into; every node has a subscriber and a group member (n0, n1) on them; n0
// has a producer with a deep queue to a topic n1 owns. n0 closes.
func runLeaveUnderLoad(t *testing.T, c *testcluster.Cluster, lc leaveCase) {
	log := newRunLog()
	leaver := c.Nodes[0]
	topics := ownedTopics(t, leaver, "lv", 3)
	var leaverSubs []*pubsub.Subscription
	for _, topic := range topics {
		for i, n := range c.Nodes {
			s := subscribe(t, n, topic, log.handler)
			if i == 0 {
				leaverSubs = append(leaverSubs, s)
			}
			if i <= 1 {
				g, err := n.Subscribe(ctxT(t), topic, log.handler, pubsub.WithGroup("g"))
				if err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					leaverSubs = append(leaverSubs, g)
				}
			}
		}
	}
	// the leaver's own topic target, owned by n1, subscribed on n1 and n2
	ownTopic := ownedTopics(t, c.Nodes[1], "own", 1)[0]
	subscribe(t, c.Nodes[1], ownTopic, log.handler)
	subscribe(t, c.Nodes[2], ownTopic, log.handler)

	streams := streamAll(t, c, topics, 1, 2)
	waitStreaming(t, streams, 200, "before the leave")

	var own *pubsub.BatchingProducer
	var ownSent []sentMsg
	if lc.deepQueue > 0 {
		var err error
		own, err = pubsub.NewBatchingProducer(leaver, ownTopic, pubsub.ProducerConfig{MaxQueueSize: lc.deepQueue + 10, OnPublishError: retryThenContinue})
		if err != nil {
			t.Fatal(err)
		}
		for i := range lc.deepQueue {
			d := fmt.Sprintf("own-%d", i)
			ownSent = append(ownSent, sentMsg{d, own.Produce(context.Background(), []byte(d))})
		}
	}

	if lc.fault != nil {
		lc.fault(c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), lc.closeTimeout)
	defer cancel()
	start := time.Now()
	var second error
	var secondTook time.Duration
	var wg sync.WaitGroup
	if lc.doubleClose {
		wg.Go(func() {
			s := time.Now()
			second = leaver.Close(context.Background())
			secondTook = time.Since(s)
		})
	}
	err := leaver.Close(ctx)
	took := time.Since(start)
	wg.Wait()
	t.Logf("Close took %v err=%v (second: %v in %v)", took, err, second, secondTook)
	if took > lc.closeTimeout+2*time.Second {
		t.Errorf("Close took %v with a %v context", took, lc.closeTimeout)
	}
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Close error %v is not a deadline", err)
	}
	if lc.fault != nil {
		// The fault lasts until every survivor dropped the leaver.
		testcluster.WaitFor(t, 10*time.Second, func() bool {
			for _, n := range c.Nodes[1:] {
				for _, m := range n.Members() {
					if m.ID == leaver.ID() {
						return false
					}
				}
			}
			return true
		}, "survivors never dropped the leaver")
		t.Logf("survivors dropped the leaver %v after Close began", time.Since(start))
		c.HealAll()
	}
	requireEndedClosed(t, leaverSubs)
	if own != nil {
		pctx, pcancel := context.WithTimeout(context.Background(), 3*time.Second)
		ps := time.Now()
		perr := own.Close(pctx)
		pcancel()
		t.Logf("leaver's producer Close took %v err=%v", time.Since(ps), perr)
		if time.Since(ps) > 5*time.Second {
			t.Errorf("leaver's producer Close took %v", time.Since(ps))
		}
		t.Logf("leaver's producer outcomes: %v", checkHonest(t, log, ownSent, 10*time.Second))
	}

	// The survivors serve n0's topics again: more accepted batches on
	// every stream after the leave.
	waitStreaming(t, streams, 200, "after the leave")
	stopStreams(t, log, streams)
	for _, topic := range topics {
		// n1's and n2's subscribers plus the group (n1's member): 3.
		publishUntilAccepted(t, c.Nodes[1], topic, []byte("after-"+topic), 3, 5*time.Second)
		publishUntilAccepted(t, c.Nodes[2], topic, []byte("after2-"+topic), 3, 5*time.Second)
	}
	for _, n := range c.Nodes[1:] {
		for _, m := range n.Members() {
			if m.ID == leaver.ID() {
				t.Errorf("%s still lists %s", n.ID(), m.ID)
			}
		}
	}
}

func TestSoakLeaveUnderLoad(t *testing.T) {
	c := newCluster(t, 3, 3)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 10 * time.Second, deepQueue: 200000})
}

func TestSoakLeaveShortDeadline(t *testing.T) {
	c := newCluster(t, 3, 3)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 30 * time.Millisecond, deepQueue: 200000})
}

func TestSoakLeaveDoubleClose(t *testing.T) {
	c := newCluster(t, 3, 3)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 10 * time.Second, doubleClose: true, deepQueue: 50000})
}

func TestSoakLeaveOneWayStall(t *testing.T) {
	c := newFaultyCluster(t)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 3 * time.Second, deepQueue: 50000,
		fault: func(c *testcluster.Cluster) { c.StallRoute(0, 1) }})
}

func TestSoakLeaveOneWayStallIn(t *testing.T) {
	c := newFaultyCluster(t)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 3 * time.Second, deepQueue: 50000,
		fault: func(c *testcluster.Cluster) { c.StallRoute(1, 0) }})
}

func TestSoakLeaveExpiredContext(t *testing.T) {
	c := newCluster(t, 3, 3)
	runLeaveUnderLoad(t, c, leaveCase{closeTimeout: 0, deepQueue: 50000})
}

// requireEndedClosed checks that each of a leaver's subscriptions ends, within
// 5 s, with ErrClosed.
func requireEndedClosed(t *testing.T, subs []*pubsub.Subscription) {
	t.Helper()
	for _, s := range subs {
		select {
		case <-s.Done():
			if !errors.Is(s.Err(), pubsub.ErrClosed) {
				t.Errorf("leaver's subscription %s ended with %v", s.ID(), s.Err())
			}
		case <-time.After(5 * time.Second):
			t.Errorf("leaver's subscription %s not ended", s.ID())
		}
	}
}

// streamAll starts a streamer from every node in from into every topic.
func streamAll(t *testing.T, c *testcluster.Cluster, topics []string, from ...int) []*streamer {
	var streams []*streamer
	for _, topic := range topics {
		for _, i := range from {
			streams = append(streams, startStreamer(t, c.Nodes[i], topic, fmt.Sprintf("%s-from-n%d", topic, i)))
		}
	}
	return streams
}

func waitStreaming(t *testing.T, streams []*streamer, more int64, what string) {
	t.Helper()
	base := make([]int64, len(streams))
	for i, s := range streams {
		base[i] = s.accepted.Load()
	}
	testcluster.WaitFor(t, 20*time.Second, func() bool {
		for i, s := range streams {
			if s.accepted.Load() < base[i]+more {
				return false
			}
		}
		return true
	}, "streams not flowing: %s", what)
}

func stopStreams(t *testing.T, log *runLog, streams []*streamer) {
	t.Helper()
	for _, s := range streams {
		close(s.stop)
		<-s.done
		pctx, pcancel := context.WithTimeout(context.Background(), 15*time.Second)
		if err := s.p.Close(pctx); err != nil {
			t.Errorf("producer close: %v", err)
		}
		pcancel()
	}
	total := map[string]int{}
	for _, s := range streams {
		for k, v := range checkHonest(t, log, s.sent, 15*time.Second) {
			total[k] += v
		}
	}
	t.Logf("stream outcomes: %v", total)
}

// Two owners leave at once while the others stream into their topics.
func TestSoakLeaveTwoNodesAtOnce(t *testing.T) {
	c := newCluster(t, 3, 5)
	log := newRunLog()
	topics := append(ownedTopics(t, c.Nodes[0], "two-a", 2), ownedTopics(t, c.Nodes[1], "two-b", 2)...)
	var leaverSubs []*pubsub.Subscription
	for _, topic := range topics {
		for i, n := range c.Nodes {
			s := subscribe(t, n, topic, log.handler)
			g, err := n.Subscribe(ctxT(t), topic, log.handler, pubsub.WithGroup("g"))
			if err != nil {
				t.Fatal(err)
			}
			if i <= 1 {
				leaverSubs = append(leaverSubs, s, g)
			}
		}
	}
	streams := streamAll(t, c, topics, 2, 3, 4)
	waitStreaming(t, streams, 200, "before")
	var wg sync.WaitGroup
	for _, i := range []int{0, 1} {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			s := time.Now()
			err := c.Nodes[i].Close(ctx)
			t.Logf("n%d Close took %v err=%v", i, time.Since(s), err)
			if err != nil || time.Since(s) > 10*time.Second {
				t.Errorf("n%d Close: %v after %v", i, err, time.Since(s))
			}
		})
	}
	wg.Wait()
	requireEndedClosed(t, leaverSubs)
	waitStreaming(t, streams, 200, "after")
	stopStreams(t, log, streams)
	for _, topic := range topics {
		// n2..n4's subscribers and the group: 4.
		publishUntilAccepted(t, c.Nodes[2], topic, []byte("after-"+topic), 4, 5*time.Second)
	}
}

// A node closes right after its Join returned, before the others'
// views converged on it, while they stream into topics it is to own.
func TestSoakLeaveRightAfterJoin(t *testing.T) {
	c := newCluster(t, 3, 3)
	log := newRunLog()
	// topics the joiner n3 will own: computed from a probe view is not
	// possible before it exists, so stream into many topics.
	var topics []string
	for i := range 12 {
		topics = append(topics, fmt.Sprintf("raj-%d", i))
	}
	for _, topic := range topics {
		for _, n := range c.Nodes {
			subscribe(t, n, topic, log.handler)
		}
	}
	streams := streamAll(t, c, topics[:6], 1, 2)
	waitStreaming(t, streams, 100, "before")
	for round := range 3 {
		id := fmt.Sprintf("j%d", round)
		n := c.AddNode(t, id, round%3, fast...)
		sub := subscribe(t, n, topics[round], log.handler)
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		s := time.Now()
		err := n.Close(ctx)
		cancel()
		t.Logf("%s Close right after join took %v err=%v", id, time.Since(s), err)
		if err != nil {
			t.Errorf("%s Close: %v", id, err)
		}
		select {
		case <-sub.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("joiner's subscription not ended")
		}
	}
	c.WaitConverged(t, 10*time.Second, 0, 1, 2)
	waitStreaming(t, streams, 100, "after")
	stopStreams(t, log, streams)
	for _, topic := range topics {
		publishUntilAccepted(t, c.Nodes[0], topic, []byte("after-"+topic), 3, 5*time.Second)
	}
}

// BatchingProducer.Close with a context that ends while batches are in
// flight to slow subscribers.
func TestSoakProducerCloseExpiresInFlight(t *testing.T) {
	c := newCluster(t, 3, 3)
	log := newRunLog()
	topic := ownedTopics(t, c.Nodes[1], "pcl", 1)[0]
	var running atomic.Int64
	slow := func(ctx context.Context, m *pubsub.Message) error {
		running.Add(1)
		defer running.Add(-1)
		time.Sleep(2 * time.Millisecond) // handler work, not synchronisation
		return log.handler(ctx, m)
	}
	subscribe(t, c.Nodes[1], topic, slow)
	subscribe(t, c.Nodes[2], topic, slow)
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{BatchSize: 20})
	if err != nil {
		t.Fatal(err)
	}
	var sent []sentMsg
	for i := range 2000 {
		d := fmt.Sprintf("p-%d", i)
		sent = append(sent, sentMsg{d, p.Produce(context.Background(), []byte(d))})
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { _, _, ok := sent[100].f.Result(); return ok }, "no progress")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	s := time.Now()
	err = p.Close(ctx)
	t.Logf("producer Close took %v err=%v", time.Since(s), err)
	if time.Since(s) > 2*time.Second {
		t.Errorf("Close took %v", time.Since(s))
	}
	// let the subscribers finish what reached them
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		a := log.total()
		if running.Load() != 0 {
			return false
		}
		return a == log.total()
	}, "handlers busy")
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		// nothing more arrives for a while: ask the owner with a publish round trip
		ack, err := c.Nodes[0].Publish(context.Background(), topic, []byte("barrier"))
		return err == nil && ack.Delivered == 2
	}, "barrier")
	t.Logf("outcomes: %v", checkHonest(t, log, sent, 10*time.Second))
}

func (r *runLog) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.runs)
}
