package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// failureOf returns the status ack reports for subscriber id, and whether
// it reports one.
func failureOf(ack pubsub.PublishAck, id pubsub.SubscriberID) (pubsub.DeliveryStatus, bool) {
	for _, f := range ack.Failures {
		if f.Subscriber == id {
			return f.Status, true
		}
	}
	return 0, false
}

func TestHandlerErrorIsReportedThenEvicted(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(3))
	ctx := ctxT(t)
	const topic = "flaky"
	good := newRecorder()
	bad := subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error { return errors.New("boom") })
	ok := subscribe(t, c.Nodes[2], topic, good.handler)
	for i := 0; i < 3; i++ {
		ack, err := c.Nodes[0].Publish(ctx, topic, msg(i))
		if err != nil || ack.Delivered != 1 {
			t.Fatalf("publish %d: ack %+v err %v, want accepted with 1 delivered", i, ack, err)
		}
		if st, found := failureOf(ack, bad.ID()); !found || st != pubsub.HandlerError {
			t.Fatalf("publish %d: failures %+v, want %s with handler-error", i, ack.Failures, bad.ID())
		}
	}
	select {
	case <-bad.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("failing subscriber not evicted after EvictAfter failures")
	}
	require.ErrorIs(t, bad.Err(), pubsub.ErrEvicted)
	for i := 3; i < 6; i++ {
		ack, err := c.Nodes[0].Publish(ctx, topic, msg(i))
		mustAccept(t, ack, err, 1)
	}
	require.Len(t, good.of(ok.ID()), 6, "messages received by the healthy subscriber")
}

func TestSuccessResetsFailureCount(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithEvictAfter(2))
	ctx := ctxT(t)
	var calls atomic.Int32
	s := subscribe(t, c.Nodes[0], "alternating", func(context.Context, *pubsub.Message) error {
		if calls.Add(1)%2 == 1 {
			return errors.New("odd call fails")
		}
		return nil
	})
	for i := 0; i < 6; i++ {
		_, err := c.Nodes[0].Publish(ctx, "alternating", msg(i))
		require.NoError(t, err)
	}
	require.NoError(t, s.Err(), "subscriber failing every other batch was evicted")
}

func TestPanickingHandlerIsRecovered(t *testing.T) {
	logs := &syncBuffer{}
	c := newCluster(t, 3, 2, warnLogger(logs))
	ctx := ctxT(t)
	const topic = "panics"
	p := subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error { panic("handler bug") })
	ack, err := c.Nodes[0].Publish(ctx, topic, []byte("x"))
	require.NoError(t, err)
	if st, found := failureOf(ack, p.ID()); !found || st != pubsub.HandlerError {
		t.Fatalf("failures %+v, want handler-error for the panicking subscriber", ack.Failures)
	}
	// The node logs the panic with the handler's stack, to find the bug.
	assert.Contains(t, logs.String(), "handler panicked: handler bug")
	assert.Contains(t, logs.String(), "TestPanickingHandlerIsRecovered", "no stack logged with the panic")
	rec := newRecorder()
	subscribe(t, c.Nodes[1], "after-panic", rec.handler)
	ack, err = c.Nodes[0].Publish(ctx, "after-panic", []byte("y"))
	mustAccept(t, ack, err, 1)
}

func TestSlowSubscriberIsIsolated(t *testing.T) {
	const subTimeout = time.Second
	c := newCluster(t, 3, 3, pubsub.WithSubscriberTimeout(subTimeout), pubsub.WithEvictAfter(100))
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // runs before the cluster's cleanup
	ctx := ctxT(t)
	const topic = "slow"
	slow := subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error {
		<-release // blocks past its timeout, ignoring ctx
		return nil
	})
	var fastIDs []pubsub.SubscriberID
	rec := newRecorder()
	for _, n := range c.Nodes {
		fastIDs = append(fastIDs, subscribe(t, n, topic, rec.handler).ID())
	}
	// Another topic on the same nodes keeps its pace while the slow one blocks.
	other := newRecorder()
	for _, n := range c.Nodes {
		subscribe(t, n, "other", other.handler)
	}
	done := make(chan pubsub.PublishAck, 1)
	go func() {
		ack, _ := c.Nodes[0].Publish(ctx, topic, []byte("x"))
		done <- ack
	}()
	// Every fast subscriber gets the message long before the slow one times out.
	testcluster.WaitFor(t, subTimeout/2, func() bool { return rec.total() == 3 }, "fast subscribers got %d of 3 while a slow one blocked", rec.total())
	start := time.Now()
	for i := 0; i < 20; i++ {
		ack, err := c.Nodes[2].Publish(ctx, "other", msg(i))
		mustAccept(t, ack, err, 3)
	}
	if d := time.Since(start); d > subTimeout/2 {
		t.Fatalf("20 publishes to another topic took %v while a subscriber was stuck", d)
	}
	ack := <-done
	if ack.Status != pubsub.Accepted || ack.Delivered != 3 {
		t.Fatalf("ack %+v, want accepted with 3 delivered", ack)
	}
	if st, found := failureOf(ack, slow.ID()); !found || st != pubsub.Timeout {
		t.Fatalf("failures %+v, want timeout for %s", ack.Failures, slow.ID())
	}
	for _, id := range fastIDs {
		if _, found := failureOf(ack, id); found {
			t.Fatalf("healthy subscriber %s reported failed: %+v", id, ack.Failures)
		}
	}
}

func TestMailboxFull(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithSubscriberTimeout(300*time.Millisecond), pubsub.WithEvictAfter(1000))
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	n := c.Nodes[0]
	ctx := ctxT(t)
	s, err := n.Subscribe(ctx, "full", func(context.Context, *pubsub.Message) error { <-release; return nil }, pubsub.WithSubscriptionMailbox(1))
	require.NoError(t, err)
	// Batch 1 occupies the handler, batch 2 the single mailbox slot; batch 3 has no room.
	acks := make([]pubsub.PublishAck, 3)
	for i := range acks {
		ack, err := n.Publish(ctx, "full", msg(i))
		require.NoError(t, err, "publish %d", i)
		acks[i] = ack
	}
	st, found := failureOf(acks[2], s.ID())
	if !found || (st != pubsub.MailboxFull && st != pubsub.Timeout) {
		t.Fatalf("third ack %+v, want a failure for the full mailbox", acks[2])
	}
	sawFull := false
	for _, a := range acks {
		if st, _ := failureOf(a, s.ID()); st == pubsub.MailboxFull {
			sawFull = true
		}
	}
	if !sawFull {
		t.Fatalf("no ack reported mailbox-full: %+v", acks)
	}
}

func TestOwnerCrashTopicsMoveToSurvivors(t *testing.T) {
	leakcheck.Parallel(t)
	const memberTimeout = 2 * time.Second // as in fast
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "crash")
	rec := newRecorder()
	s0 := subscribe(t, c.Nodes[0], topic, rec.handler)
	s1 := subscribe(t, c.Nodes[1], topic, rec.handler)
	s2 := subscribe(t, c.Nodes[2], topic, rec.handler)
	ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("before"))
	mustAccept(t, ack, err, 3)

	crashed := time.Now()
	c.Crash(0)
	ack = publishUntilAccepted(t, c.Nodes[1], topic, []byte("after"), 2, memberTimeout+3*time.Second)
	t.Logf("publishes accepted again %v after the crash (MemberTimeout %v)", time.Since(crashed), memberTimeout)
	if _, found := failureOf(ack, s0.ID()); found {
		t.Fatalf("crashed node's subscriber still in ack: %+v", ack)
	}
	for _, s := range []*pubsub.Subscription{s1, s2} {
		got := rec.of(s.ID())
		require.NotEmpty(t, got, "messages received by %s", s.ID())
		require.Equal(t, "after", got[len(got)-1], "last message received by %s, of %q", s.ID(), got)
	}
}

func TestSubscriptionsSurviveRepeatedOwnershipChanges(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	rec := newRecorder()
	var topics []string
	var a, b []pubsub.SubscriberID
	for i := 0; i < 12; i++ {
		topic := fmt.Sprintf("survive-%d", i)
		topics = append(topics, topic)
		a = append(a, subscribe(t, c.Nodes[1], topic, rec.handler).ID())
		b = append(b, subscribe(t, c.Nodes[2], topic, rec.handler).ID())
	}
	round := 0
	check := func(step string) {
		t.Helper()
		t.Logf("checking after %s", step)
		round++
		for i, topic := range topics {
			data := []byte(fmt.Sprintf("%s-%d", step, round))
			publishUntilAccepted(t, c.Nodes[1], topic, data, 2, 5*time.Second)
			for _, id := range []pubsub.SubscriberID{a[i], b[i]} {
				if got := rec.of(id); len(got) == 0 || got[len(got)-1] != string(data) {
					t.Fatalf("after %s: %s on %s last got %q, want %s", step, id, topic, got, data)
				}
			}
		}
	}
	check("start")
	newNode := c.AddNode(t, "n3", 0, fast...)
	c.WaitConverged(t, 5*time.Second)
	owned := 0
	for _, topic := range topics {
		if m, _ := newNode.OwnerOf(topic); m.ID == "n3" {
			owned++
		}
	}
	t.Logf("the joining node took over %d of %d topics", owned, len(topics))
	check("join")
	c.Crash(3)
	c.WaitConverged(t, 5*time.Second)
	check("crash")
	c.CloseNode(t, 0)
	c.WaitConverged(t, 5*time.Second)
	check("close")
}

func TestServerLossNodeFailsOver(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithMemberTimeout(3*time.Second))
	left := make(chan pubsub.MemberLeft, 16)
	cancel := c.Nodes[0].Events().Subscribe(func(e pubsub.Event) {
		if l, ok := e.(pubsub.MemberLeft); ok {
			left <- l
		}
	})
	defer cancel()
	rec := newRecorder()
	s1 := subscribe(t, c.Nodes[1], "failover", rec.handler)
	subscribe(t, c.Nodes[0], "failover", rec.handler)

	c.ShutdownServer(1)
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		return c.Conns[1].IsConnected() && c.Conns[1].ConnectedUrl() != c.Servers.URL(1)
	}, "node 1 did not reconnect to another server")
	// Node 1 still receives and publishes.
	publishUntilAccepted(t, c.Nodes[0], "failover", []byte("to-1"), 2, 5*time.Second)
	publishUntilAccepted(t, c.Nodes[1], "failover", []byte("from-1"), 2, 5*time.Second)
	got := rec.of(s1.ID())
	require.NotEmpty(t, got, "messages received by node 1's subscriber")
	require.Equal(t, "from-1", got[len(got)-1], "last message received by node 1's subscriber, of %q", got)
	select {
	case l := <-left:
		t.Fatalf("membership flapped during a short server outage: %+v", l)
	default:
	}
}

func TestPublishDuringOwnershipChangeIsNeverSilentlyLost(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	var topics []string
	rec := newRecorder()
	var survivors []pubsub.SubscriberID
	for i := 0; i < 6; i++ {
		topic := fmt.Sprintf("moving-%d", i)
		topics = append(topics, topic)
		subscribe(t, c.Nodes[0], topic, rec.handler)
		survivors = append(survivors, subscribe(t, c.Nodes[1], topic, rec.handler).ID(), subscribe(t, c.Nodes[2], topic, rec.handler).ID())
	}
	type sent struct {
		topic string
		data  string
		ack   pubsub.PublishAck
	}
	var mu sync.Mutex
	var accepted []sent
	stop := make(chan struct{})
	var wg sync.WaitGroup
	publishers := []*pubsub.Node{c.Nodes[1], c.Nodes[2]}
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				topic := topics[i%len(topics)]
				data := fmt.Sprintf("w%d-%d", w, i)
				ack, err := publishers[w].Publish(context.Background(), topic, []byte(data))
				if err != nil {
					if ack.Status != pubsub.Rejected || !errors.Is(err, ack.Reason.Err()) {
						t.Errorf("error %v with ack %+v", err, ack)
					}
					continue
				}
				mu.Lock()
				accepted = append(accepted, sent{topic, data, ack})
				mu.Unlock()
			}
		}(w)
	}
	c.AddNode(t, "n3", 1, fast...)
	c.WaitConverged(t, 5*time.Second)
	c.CloseNode(t, 0)
	c.WaitConverged(t, 5*time.Second)
	c.Crash(3)
	c.WaitConverged(t, 5*time.Second)
	close(stop)
	wg.Wait()
	if len(accepted) == 0 {
		t.Fatal("nothing accepted")
	}
	// Every accepted message reached every surviving subscriber of its
	// topic, or the ack said it did not.
	got := map[pubsub.SubscriberID]map[string]bool{}
	for _, id := range survivors {
		got[id] = map[string]bool{}
		for _, d := range rec.of(id) {
			got[id][d] = true
		}
	}
	topicOf := func(id pubsub.SubscriberID) string {
		for i, s := range survivors {
			if s == id {
				return topics[i/2]
			}
		}
		return ""
	}
	missing := 0
	for _, s := range accepted {
		for _, id := range survivors {
			if topicOf(id) != s.topic || got[id][s.data] {
				continue
			}
			if _, reported := failureOf(s.ack, id); !reported {
				missing++
				t.Errorf("%s accepted (%+v) but %s neither received it nor was reported failed", s.data, s.ack, id)
			}
		}
	}
	t.Logf("%d publishes accepted during join, leave and crash; %d silently missing", len(accepted), missing)
}
