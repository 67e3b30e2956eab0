//go:build soak

package pubsub

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The slower churn probes (collected idle actors are checked once per
// MemberTimeout): go test -race -tags soak -run SoakChurn .

// actorCount is the number of topic actors n holds.
func actorCount(n *Node) int {
	n.owner.mu.Lock()
	defer n.owner.mu.Unlock()
	return len(n.owner.topics)
}

// Distinct topics published once, with no subscriber, at every ack level:
// the owners' actors are collected, the publisher's outboxes forgotten,
// and no goroutine stays.
func TestSoakChurnTopicsPublishedOnceAreReleased(t *testing.T) {
	for _, level := range []AckLevel{AckDelivered, AckAccepted, AckNone} {
		t.Run(level.String(), func(t *testing.T) {
			_, a, b, c := churnTrio(t)
			base := runtime.NumGoroutine()
			const topics = 1000
			inParallel(topics, func(i int) {
				_, err := a.PublishMessages(t.Context(), fmt.Sprintf("once-%d", i), []Outgoing{{Data: []byte("x")}}, WithAck(level))
				assert.NoError(t, err)
			})
			peak := actorCount(a) + actorCount(b) + actorCount(c)
			t.Logf("actors right after: %d", peak)
			waitForTest(t, "actors collected", func() bool { return actorCount(a)+actorCount(b)+actorCount(c) == 0 })
			a.publisher.out.mu.Lock()
			boxes := len(a.publisher.out.boxes)
			a.publisher.out.mu.Unlock()
			assert.Zero(t, boxes, "outboxes")
			waitGoroutines(t, base, 5)
		})
	}
}

// Subscribe and unsubscribe on thousands of distinct topics, and with
// thousands of group names on one topic that keeps a subscriber: the
// owners forget them (actors collected, group books empty), the
// subscriber side holds none.
func TestSoakChurnSubscriptionsAreReleased(t *testing.T) {
	_, a, b, c := churnTrio(t)
	keep := ownedTopics(a, "b", "groups", 1)[0]
	_, err := c.Subscribe(t.Context(), keep, func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	base := runtime.NumGoroutine()
	const topics = 2000
	inParallel(topics, func(i int) {
		s, err := c.Subscribe(t.Context(), fmt.Sprintf("sub-%d", i), func(context.Context, *Message) error { return nil })
		if assert.NoError(t, err) {
			assert.NoError(t, s.Unsubscribe(t.Context()))
		}
		g, err := a.Subscribe(t.Context(), keep, func(context.Context, *Message) error { return nil }, WithGroup(fmt.Sprintf("g%d", i)))
		if assert.NoError(t, err) {
			assert.NoError(t, g.Unsubscribe(t.Context()))
		}
	})
	_, err = a.Publish(t.Context(), keep, []byte("x"))
	require.NoError(t, err)
	var sizes, next, vanished, subs int
	onActorWait(b, keep, func(a *topicActor) {
		sizes, next, vanished, subs = len(a.groups.sizes), len(a.groups.next), len(a.groups.vanished), int(a.count.Load())
	})
	assert.Equal(t, 1, subs)
	assert.Zero(t, sizes+next+vanished, "group book: sizes %d next %d vanished %d", sizes, next, vanished)
	waitForTest(t, "actors collected", func() bool { return actorCount(a)+actorCount(b)+actorCount(c) == 1 })
	for _, n := range []*Node{a, c} {
		n.subscriber.mu.RLock()
		held := len(n.subscriber.subs)
		n.subscriber.mu.RUnlock()
		assert.LessOrEqual(t, held, 1, "%s's subscriptions", n.self.ID)
	}
	waitGoroutines(t, base, 5)
}

// Nodes joining, subscribing and leaving (gracefully or by a crash) over
// and over: the members that stay keep no per-member state for them past
// its bounds.
func TestSoakChurnMembersLeaveNoState(t *testing.T) {
	cl, a, b, c := churnTrio(t)
	topic := ownedTopics(a, "b", "members", 1)[0]
	base := runtime.NumGoroutine()
	const rounds = 6
	for i := range rounds {
		nc, err := nats.Connect(cl.URL(i % 3))
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		n, err := Join(ctx, nc, append([]Option{WithNodeID(fmt.Sprintf("churn-%d", i))}, churnOpts...)...)
		cancel()
		require.NoError(t, err)
		_, err = n.Subscribe(t.Context(), topic, func(context.Context, *Message) error { return nil })
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, n.Close(t.Context()))
			nc.Close()
		} else {
			nc.Close() // a crash: no LEAVE, the node stops on its lost connection
			<-n.life.ctx.Done()
			require.NoError(t, n.Close(t.Context()))
		}
	}
	for _, n := range []*Node{a, b, c} {
		waitForTest(t, "churned members gone", func() bool { return len(n.view().members) == 3 })
	}
	_, err := a.Publish(t.Context(), topic, []byte("x"))
	require.NoError(t, err)
	for _, n := range []*Node{a, b, c} {
		// A call may be in flight at any instant (a sync, a report):
		// what must not stay is one for a member that left.
		waitForTest(t, "rpc calls settle", func() bool {
			n.rpc.mu.Lock()
			defer n.rpc.mu.Unlock()
			return len(n.rpc.pending) == 0
		})
		n.members.mu.Lock()
		peers, left, timedOut := len(n.members.peers), len(n.members.left), len(n.members.sameID.timedOut)
		n.members.mu.Unlock()
		n.owner.registry.mu.Lock()
		answered, handover, pending := len(n.owner.registry.answered), len(n.owner.registry.handover), len(n.owner.registry.subs)
		n.owner.registry.mu.Unlock()
		n.rpc.mu.Lock()
		calls := len(n.rpc.pending)
		n.rpc.mu.Unlock()
		n.log.limit.mu.Lock()
		keys := len(n.log.limit.keys)
		n.log.limit.mu.Unlock()
		t.Logf("%s: peers %d left %d timedOut %d answered %d handover %d pending %d calls %d log keys %d",
			n.self.ID, peers, left, timedOut, answered, handover, pending, calls, keys)
		assert.LessOrEqual(t, peers, 3)
		assert.LessOrEqual(t, answered, 3)
		assert.Zero(t, handover)
		assert.LessOrEqual(t, left+timedOut, rounds, "leaves and timeouts remembered")
		assert.Zero(t, calls)
	}
	var nodes int
	onActorWait(b, topic, func(a *topicActor) { nodes = len(a.nodes) })
	assert.Zero(t, nodes)
	waitGoroutines(t, base, 5)
}

// libraryHeap is the heap in use allocated under this package's code, and
// not the embedded NATS servers' (their per-client subject caches grow
// with every reply subject up to their own limits), as the memory profile
// samples it.
func libraryHeap() int64 {
	runtime.GC()
	runtime.GC()
	n, _ := runtime.MemProfile(nil, false)
	recs := make([]runtime.MemProfileRecord, n+64)
	n, _ = runtime.MemProfile(recs, false)
	var total int64
	for _, r := range recs[:n] {
		ours := false
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			if strings.Contains(f.Function, "nats-server") {
				ours = false
				break
			}
			if strings.HasPrefix(f.Function, "github.com/clusterpubsub/pubsub.") && !strings.Contains(f.Function, "Test") && !strings.Contains(f.Function, "churnTrio") {
				ours = true
			}
			if !more {
				break
			}
		}
		if ours {
			total += r.InUseBytes()
		}
	}
	return total
}

// Every kind of per-topic churn at once, 1x then 4x: once the actors are
// collected the heap must not have grown with the churn.
func TestSoakChurnHeapDoesNotGrowWithTopicChurn(t *testing.T) {
	_, a, b, c := churnTrio(t)
	round := 0
	churn := func(topics int) {
		round++
		inParallel(topics, func(i int) {
			topic := fmt.Sprintf("heap-%d-%d", round, i)
			s, err := c.Subscribe(t.Context(), topic, func(context.Context, *Message) error { return nil })
			if !assert.NoError(t, err) {
				return
			}
			_, err = a.Publish(t.Context(), topic, []byte("x"))
			assert.NoError(t, err)
			_, err = a.PublishMessages(t.Context(), topic, []Outgoing{{Data: []byte("y")}}, WithAck(AckNone))
			assert.NoError(t, err)
			p, err := NewBatchingProducer(b, topic, ProducerConfig{})
			if assert.NoError(t, err) {
				p.Produce(t.Context(), []byte("z"))
				assert.NoError(t, p.Close(t.Context()))
			}
			assert.NoError(t, s.Unsubscribe(t.Context()))
		})
		waitForTest(t, "actors collected", func() bool { return actorCount(a)+actorCount(b)+actorCount(c) == 0 })
		// Their producer marks went back with them (no drift in the count).
		waitForTest(t, "producer marks returned", func() bool {
			return a.Stats().ProducerMarks+b.Stats().ProducerMarks+c.Stats().ProducerMarks == 0
		})
	}
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 4096
	churn(500) // warm-up: pools, and the maps' peak size (a Go map keeps its buckets)
	base := runtime.NumGoroutine()
	h0 := libraryHeap()
	churn(125)
	h1 := libraryHeap()
	churn(500)
	h4 := libraryHeap()
	churn(500)
	h8 := libraryHeap()
	t.Logf("library heap sampled since the warm-up %d KB; after 1x %+d KB, 4x more %+d KB, 4x again %+d KB",
		h0/1024, (h1-h0)/1024, (h4-h0)/1024, (h8-h0)/1024)
	assert.Less(t, h8-h0, int64(1<<20), "the library's heap grew with churn")
	waitGoroutines(t, base, 5)
}
