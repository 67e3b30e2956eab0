package pubsub

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// markMaps returns the marks n's actors of topics and its subscriptions
// hold, read on their actors and mailboxes, and how many maps hold any.
// Actors are read on their own serial, not through onActorWait, which would
// make a missing actor and renew an idle one's time, delaying the
// collection the test then waits for.
func markMaps(n *Node, topics []string, subs []*Subscription) (marks, maps int) {
	count := func(k int) {
		marks += k
		if k > 0 {
			maps++
		}
	}
	n.owner.mu.Lock()
	var actors []*topicActor
	for _, tp := range topics {
		if a := n.owner.topics[tp]; a != nil {
			actors = append(actors, a)
		}
	}
	n.owner.mu.Unlock()
	for _, a := range actors {
		done := make(chan struct{})
		a.s.doUpTo(func() { count(len(a.producers.m)); close(done) }, 0)
		<-done
	}
	for _, s := range subs {
		if s.node == n {
			onMailboxWait(s, func() { count(len(s.producers.m)); count(len(s.rerouted.m)) })
		}
	}
	return marks, maps
}

// Many topics, each with many short-lived BatchingProducers, past a small
// node budget: the owner's actors and the subscriber's subscriptions
// together hold at most the budget plus producerMarksFloor per map (each
// map alone stays under maxTrackedProducers, so only the node-wide budget
// holds them: with it off, the owner held all 6 x 24), the node's count
// is what the maps hold, and forgetting is counted. A producer that keeps
// publishing meanwhile is delivered whole and in order. Once every
// subscription ended and the actors were collected, both nodes count 0.
func TestProducerMarksAreBoundedPerNode(t *testing.T) {
	leakcheck.Parallel(t)
	_, a, b, c := churnTrio(t)
	const budget, topicCount, producers, kept = 32, 6, 24, 200
	for _, n := range []*Node{a, b, c} {
		n.marks.limit.Store(budget)
	}
	topics := ownedTopics(a, "b", "marks", topicCount)
	var mu sync.Mutex
	got := map[string]int{}
	var keptSeen []int
	subs := make([]*Subscription, 0, topicCount)
	for _, tp := range topics {
		s, err := c.Subscribe(t.Context(), tp, func(_ context.Context, m *Message) error {
			mu.Lock()
			defer mu.Unlock()
			got[m.Topic]++
			if k, ok := strings.CutPrefix(string(m.Data), "kept-"); ok {
				i, _ := strconv.Atoi(k)
				keptSeen = append(keptSeen, i)
			}
			return nil
		})
		require.NoError(t, err)
		subs = append(subs, s)
	}
	// One producer keeps publishing, pipelined, through the churn.
	keeper, err := NewBatchingProducer(a, topics[0], ProducerConfig{MaxInFlight: 4, BatchSize: 1})
	require.NoError(t, err)
	keptDone := make(chan struct{})
	go func() {
		defer close(keptDone)
		for i := range kept {
			keeper.Produce(t.Context(), fmt.Appendf(nil, "kept-%d", i))
		}
		assert.NoError(t, keeper.Close(t.Context()))
	}()
	inParallel(topicCount*producers, func(i int) {
		p, err := NewBatchingProducer(a, topics[i%topicCount], ProducerConfig{})
		if !assert.NoError(t, err) {
			return
		}
		f := p.Produce(t.Context(), []byte("x"))
		assert.NoError(t, p.Close(t.Context()))
		_, err = f.Wait(t.Context())
		assert.NoError(t, err)
	})
	<-keptDone
	waitForTest(t, "every message delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		total := 0
		for _, k := range got {
			total += k
		}
		return total == topicCount*producers+kept
	})
	for _, n := range []*Node{b, c} {
		marks, maps := markMaps(n, topics, subs)
		st := n.Stats()
		t.Logf("%s: %d marks in %d maps (bound %d), counted %d, forgotten %d", n.ID(), marks, maps, budget+producerMarksFloor*maps, st.ProducerMarks, st.ProducerMarksForgotten)
		assert.LessOrEqual(t, marks, budget+producerMarksFloor*maps, "%s: marks past the node's bound", n.ID())
		assert.Equal(t, marks, st.ProducerMarks, "%s: the count is what its maps hold", n.ID())
		assert.NotZero(t, st.ProducerMarksForgotten, "%s: forgetting is counted", n.ID())
	}
	mu.Lock()
	want := make([]int, kept)
	for i := range want {
		want[i] = i
	}
	assert.Equal(t, want, keptSeen, "the kept producer's messages, whole and in order")
	mu.Unlock()

	// Half the subscriptions end by Unsubscribe, the rest with their
	// node's Close; the owner's actors are then collected.
	for _, s := range subs[:topicCount/2] {
		require.NoError(t, s.Unsubscribe(t.Context()))
	}
	require.NoError(t, c.Close(t.Context()))
	assert.Zero(t, c.Stats().ProducerMarks, "c: marks counted after every subscription ended")
	waitForTest(t, "b's actors collected", func() bool {
		b.owner.mu.Lock()
		defer b.owner.mu.Unlock()
		return len(b.owner.topics) == 0
	})
	assert.Zero(t, b.Stats().ProducerMarks, "b: marks counted after its actors were collected")
	assert.Zero(t, a.Stats().ProducerMarks, "a: the publisher holds none")
}

// An owner that closes gives its actors' marks back, as its subscriptions
// do theirs: the count does not outlive what it counts.
func TestProducerMarksReturnWhenTheOwnerCloses(t *testing.T) {
	_, a, b, c := churnTrio(t)
	topic := ownedTopics(a, "b", "marks-close", 1)[0]
	var mu sync.Mutex
	got := 0
	_, err := c.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		mu.Lock()
		got++
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	const producers = 20
	inParallel(producers, func(int) {
		p, err := NewBatchingProducer(a, topic, ProducerConfig{})
		if !assert.NoError(t, err) {
			return
		}
		p.Produce(t.Context(), []byte("x"))
		assert.NoError(t, p.Close(t.Context()))
	})
	waitForTest(t, "every message delivered", func() bool { mu.Lock(); defer mu.Unlock(); return got == producers })
	assert.Equal(t, producers, b.Stats().ProducerMarks, "b: one mark per producer")
	require.NoError(t, b.Close(t.Context()))
	assert.Zero(t, b.Stats().ProducerMarks, "b: marks counted after it closed")
}
