package pubsub

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// Regression (review of the outbox): a run is one request, so it must fit
// the server's max_payload, not only runBytes. With a server limit of
// 32 KiB every 64 KiB run was refused by NATS and its messages lost,
// although each call had returned Accepted.
func TestOutboxRunsFitTheServersPayloadLimit(t *testing.T) {
	s, err := embedded.StartServerWith(func(o *server.Options) { o.MaxPayload = 32 << 10 })
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	a, b, topic := pairOn(t, s.ClientURL())
	var mu sync.Mutex
	got := 0
	_, err = b.Subscribe(t.Context(), topic, func(_ context.Context, m *Message) error {
		mu.Lock()
		got++
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)

	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{} // a write in progress: runs build up, as in a fast loop
	const count = 600        // 60 KB: more than one 32 KiB request
	for range count {
		_, err := publishNone(t.Context(), a, topic, strings.Repeat("x", 100))
		require.NoError(t, err)
	}
	ob.mu.Lock()
	runs := len(ob.full) + 1
	ob.mu.Unlock()
	require.Greater(t, runs, 1, "the messages should need several requests")
	ob.unhold()
	waitForTest(t, "every message delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return got == count || a.Stats().Rejected > 0
	})
	assert.Zero(t, a.Stats().Rejected, "accepted AckNone messages lost by the publisher")
}

// Regression (review of the outbox): outboxes were bounded per topic only,
// so AckNone publishes to many topics each held a run buffer and a
// flusher goroutine with no bound across topics. Past limits.boxes
// outboxes (or limits.nodeBytes held), a publish to a topic without one
// is written directly by its caller.
func TestOutboxesAreBoundedAcrossTopics(t *testing.T) {
	a, _, _, _ := outboxPair(t)
	out := &a.publisher.out
	out.limits.boxes = 4
	topics := ownedTopics(a, "b", "m", 10)
	var held []*outbox
	defer func() {
		for _, ob := range held {
			ob.unhold()
		}
	}()
	for i, tp := range topics {
		if ob := out.get(tp); ob != nil {
			ob.sending <- struct{}{} // keeps the outbox busy, so it stays
			held = append(held, ob)
		}
		ack, err := publishNone(t.Context(), a, tp, fmt.Sprint(i))
		require.NoError(t, err, "publish to topic %d", i)
		assert.Equal(t, Accepted, ack.Status)
		out.mu.Lock()
		boxes := len(out.boxes)
		out.mu.Unlock()
		require.LessOrEqual(t, boxes, 4, "outboxes past the node's limit")
	}
	require.Len(t, held, 4, "the first 4 topics get an outbox, the rest are written directly")
	assert.Equal(t, int64(4), out.live.Load())
	assert.Zero(t, a.Stats().Rejected)
}

// stalledOutbox makes client-only a hold many runs for a topic of b, then
// lets b (the only member that can own topics) leave, and hands the runs
// to a's flusher, which finds no owner.
func stalledOutbox(t *testing.T, requestTimeout time.Duration) (a *Node, topic string, runs int) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	join := func(id string, opts ...Option) *Node {
		nc, err := nats.Connect(s.ClientURL())
		require.NoError(t, err)
		t.Cleanup(nc.Close)
		n, err := Join(t.Context(), nc, append(opts, WithNodeID(id), WithHeartbeatInterval(50*time.Millisecond),
			WithMemberTimeout(2*time.Second), WithRequestTimeout(requestTimeout), WithSubscriberTimeout(time.Second))...)
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = n.Close(ctx)
		})
		return n
	}
	a = join("a", WithClientOnly())
	b := join("b")
	waitForTest(t, "views", func() bool { return len(a.view().members) == 2 && len(b.view().members) == 2 })
	topic = "stall"
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{} // a write in progress while the loop fills runs
	for range 1000 {         // ~1 MB: 16 runs of 64 KiB
		_, err := publishNone(t.Context(), a, topic, strings.Repeat("x", 1000))
		require.NoError(t, err)
	}
	ob.mu.Lock()
	runs = len(ob.full) + 1
	ob.mu.Unlock()
	require.NoError(t, b.Close(t.Context()))
	waitForTest(t, "b gone from a's view", func() bool { return a.view().ownerOf(topic).ID == "" })
	ob.unhold()
	waitForTest(t, "the flusher took the runs", func() bool {
		ob.mu.Lock()
		defer ob.mu.Unlock()
		return ob.cur.count == 0 && len(ob.full) == 0
	})
	return a, topic, runs
}

// Regression (review of the outbox): the flusher held the topic's sending
// token while each held run waited RequestTimeout for an owner, so another
// publish to the topic, or Close, waited runs x RequestTimeout (16 x 400 ms
// here). After one run fails the rest fail at once (counted in Rejected).
func TestOutboxFailedRunFailsTheRestAtOnce(t *testing.T) {
	const rt = 400 * time.Millisecond
	t.Run("publish", func(t *testing.T) {
		a, topic, runs := stalledOutbox(t, rt)
		start := time.Now()
		_, err := a.Publish(t.Context(), topic, []byte("x"))
		took := time.Since(start)
		require.ErrorIs(t, err, ErrTopicUnavailable)
		assert.Less(t, took, 4*rt, "a publish waited for %d held runs' RequestTimeouts", runs)
		waitForTest(t, "every held message counted as lost", func() bool { return a.Stats().Rejected >= 1000 })
	})
	t.Run("close", func(t *testing.T) {
		a, _, runs := stalledOutbox(t, rt)
		start := time.Now()
		require.NoError(t, a.Close(context.Background()))
		assert.Less(t, time.Since(start), 4*rt, "Close waited for %d held runs' RequestTimeouts", runs)
	})
}

// While runs are held, the topic's owner becomes the publishing node: the
// runs go to the local actor ahead of the caller's next publishes, in
// order, and nothing is lost.
func TestOutboxRunsReachALocalOwnerInOrder(t *testing.T) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	a, b, topic := pairOn(t, s.ClientURL())
	var mu sync.Mutex
	var got []string
	_, err = a.Subscribe(t.Context(), topic, func(_ context.Context, m *Message) error {
		mu.Lock()
		got = append(got, string(m.Data))
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{}
	const held = 3000
	for i := range held {
		_, err := publishNone(t.Context(), a, topic, fmt.Sprintf("%05d", i))
		require.NoError(t, err)
	}
	require.NoError(t, b.Close(t.Context()))
	waitForTest(t, "a owns", func() bool { return a.view().ownerOf(topic).ID == "a" })
	require.NoError(t, a.Initialize(t.Context(), topic))
	ob.unhold()
	for i := held; i < held+200; i++ {
		var err error
		if i%3 == 0 {
			_, err = a.Publish(t.Context(), topic, []byte(fmt.Sprintf("%05d", i)))
		} else {
			_, err = publishNone(t.Context(), a, topic, fmt.Sprintf("%05d", i))
		}
		require.NoError(t, err)
	}
	waitForTest(t, "all", func() bool { mu.Lock(); defer mu.Unlock(); return len(got) >= held+200 })
	mu.Lock()
	defer mu.Unlock()
	for i, g := range got {
		require.Equal(t, fmt.Sprintf("%05d", i), g)
	}
	assert.Zero(t, a.Stats().Rejected)
}

// Close while AckNone publishers keep publishing: every call returns
// Accepted or ErrClosed, and every accepted message is either delivered
// or counted in Rejected (never silently lost), with no goroutine left.
func TestCloseDuringAckNoneLoopsLosesNothingSilently(t *testing.T) {
	a, _, topic, got := outboxPair(t)
	var accepted, refused atomic.Int64
	var wg sync.WaitGroup
	for p := range 3 {
		wg.Go(func() {
			for i := 0; ; i++ {
				_, err := publishNone(context.Background(), a, topic, fmt.Sprintf("%d-%d", p, i))
				if err != nil {
					assert.ErrorIs(t, err, ErrClosed)
					refused.Add(1) // counted in Rejected too
					return
				}
				accepted.Add(1)
			}
		})
	}
	waitForTest(t, "publishers running", func() bool { return accepted.Load() > 1000 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, a.Close(ctx))
	wg.Wait()
	lost := func() int64 { return int64(a.Stats().Rejected) - refused.Load() }
	waitForTest(t, "every accepted message delivered or counted", func() bool {
		return int64(len(got()))+lost() >= accepted.Load()
	})
	assert.Equal(t, accepted.Load(), int64(len(got()))+lost(), "delivered + counted as lost")
	a.life.goroutines.mu.Lock()
	assert.Zero(t, a.life.goroutines.n, "goroutines left after Close")
	a.life.goroutines.mu.Unlock()
	t.Logf("%d accepted: %d delivered, %d counted as lost", accepted.Load(), len(got()), lost())
}
