package pubsub

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// Probes of per-key state that churn from users or peers can grow: each
// churns one kind of key on a 3-server cluster, then measures what is
// left (maps read on their actors, goroutines).

var churnOpts = []Option{WithHeartbeatInterval(50 * time.Millisecond), WithMemberTimeout(time.Second),
	WithRequestTimeout(3 * time.Second), WithSubscriberTimeout(2 * time.Second)}

// churnTrio joins a, b and c, one per server of a 3-server cluster.
func churnTrio(t *testing.T) (c *embedded.Cluster, a, b, cc *Node) {
	t.Helper()
	c, err := embedded.StartCluster(3)
	require.NoError(t, err)
	t.Cleanup(c.Shutdown)
	a = joinWithForTest(t, c.URL(0), "a", churnOpts...)
	b = joinWithForTest(t, c.URL(1), "b", churnOpts...)
	cc = joinWithForTest(t, c.URL(2), "c", churnOpts...)
	waitForTest(t, "views", func() bool {
		return len(a.view().members) == 3 && len(b.view().members) == 3 && len(cc.view().members) == 3
	})
	return c, a, b, cc
}

// onActorWait runs fn on topic's actor and waits for it.
func onActorWait(n *Node, topic string, fn func(*topicActor)) {
	done := make(chan struct{})
	n.owner.onActor(topic, false, func(a *topicActor) { fn(a); close(done) })
	<-done
}

// onMailboxWait runs fn on s's mailbox and waits for it.
func onMailboxWait(s *Subscription, fn func()) {
	done := make(chan struct{})
	s.mailbox.doUpTo(func() { fn(); close(done) }, 0)
	<-done
}

// inParallel runs fn(0) to fn(n-1), 32 at a time, and waits for them.
func inParallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			fn(i)
		})
	}
	wg.Wait()
}

// waitGoroutines waits until the process runs at most base+slack goroutines.
func waitGoroutines(t *testing.T, base, slack int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base+slack {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d, baseline %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// Thousands of short-lived BatchingProducers, each publishing one batch to
// one topic: the owner's per-producer order map and the subscriber's
// per-producer marks stay at their bounds (maxTrackedProducers per map;
// the node's budget, maxNodeProducerMarks, is not reached by one topic:
// TestProducerMarksAreBoundedPerNode), each forget is counted, and every
// producer's goroutine ends with its Close.
func TestChurnShortLivedProducersStayBounded(t *testing.T) {
	_, a, b, c := churnTrio(t)
	topic := ownedTopics(a, "b", "producers", 1)[0]
	var mu sync.Mutex
	got := 0
	s, err := c.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		mu.Lock()
		got++
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	base := runtime.NumGoroutine()
	const producers = 5000
	inParallel(producers, func(i int) {
		p, err := NewBatchingProducer(a, topic, ProducerConfig{})
		if !assert.NoError(t, err) {
			return
		}
		f := p.Produce(t.Context(), fmt.Appendf(nil, "%d", i))
		assert.NoError(t, p.Close(t.Context()))
		_, err = f.Wait(t.Context())
		assert.NoError(t, err)
	})
	waitForTest(t, "every message delivered", func() bool { mu.Lock(); defer mu.Unlock(); return got == producers })
	var owned, marks int
	onActorWait(b, topic, func(a *topicActor) { owned = len(a.producers.m) })
	onMailboxWait(s, func() { marks = len(s.producers.m) })
	t.Logf("owner tracks %d producers, subscription %d", owned, marks)
	// 5 000 producers: both are full, at their bound, not past it.
	assert.Equal(t, maxTrackedProducers, owned)
	assert.Equal(t, maxTrackedProducers, marks)
	for _, n := range []*Node{b, c} {
		st := n.Stats()
		assert.Equal(t, maxTrackedProducers, st.ProducerMarks, "%s: the node's count", n.ID())
		assert.Equal(t, uint64(producers-maxTrackedProducers), st.ProducerMarksForgotten, "%s: one forgotten per producer past the bound", n.ID())
	}
	waitGoroutines(t, base, 5)
}
