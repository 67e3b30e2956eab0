package pubsub_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// Probes of split batches (a batch larger than the servers' max_payload
// goes in chunks, chunks.go: chunkAcks) with consumer-group re-routes
// (a member's mailbox full, its subscription ended mid-chunk) and with
// answers sent at the publisher's deadline (answer_by.go). Servers have a
// 16 kB max_payload so a batch of a few messages splits.

// splitRig is a routed cluster of three 16 kB servers, one node on each
// (h0 publishes, h1 owns the topic, h2 holds subscribers), and what each
// named subscriber ran of the split batch, in order.
type splitRig struct {
	nodes []*pubsub.Node
	topic string
	mu    sync.Mutex
	ran   map[string][]string // subscriber name -> tags, in order
}

func newSplitRig(t *testing.T, prefix string, opts func(i int) []pubsub.Option) *splitRig {
	t.Helper()
	nodes := mixedPayloadCluster(t, []int32{16 << 10, 16 << 10, 16 << 10}, opts)
	return &splitRig{nodes: nodes, topic: ownedBy(t, nodes[1], prefix), ran: map[string][]string{}}
}

// tag of message i of a split batch; splitBatch's messages start with it.
func splitTag(i int) string { return fmt.Sprintf("s%02d", i) }

// record notes m under name when it is one of the split batch's.
func (r *splitRig) record(name string, m *pubsub.Message) {
	if len(m.Data) < 3 || m.Data[0] != 's' {
		return
	}
	r.mu.Lock()
	r.ran[name] = append(r.ran[name], string(m.Data[:3]))
	r.mu.Unlock()
}

func (r *splitRig) of(name string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ran[name]...)
}

// groupRuns counts, per tag, how many runs the named members made.
func (r *splitRig) groupRuns(members ...string) map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	runs := map[string]int{}
	for _, m := range members {
		for _, tag := range r.ran[m] {
			runs[tag]++
		}
	}
	return runs
}

// splitBatch is count messages, perChunk of them to a chunk of h0's
// MaxMessageSize (1 or 3).
func (r *splitRig) splitBatch(count, perChunk int) []pubsub.Outgoing {
	size := r.nodes[0].MaxMessageSize()*2/3 - 16
	if perChunk == 3 {
		size = r.nodes[0].MaxMessageSize()/3 - 64
	}
	out := make([]pubsub.Outgoing, count)
	for i := range out {
		out[i] = pubsub.Outgoing{Data: append([]byte(splitTag(i)), bytes.Repeat([]byte{'x'}, size)...)}
	}
	return out
}

func (r *splitRig) subscribe(t *testing.T, node int, name string, h func(context.Context, *pubsub.Message) error, opts ...pubsub.SubscribeOption) *pubsub.Subscription {
	t.Helper()
	s, err := r.nodes[node].Subscribe(ctxT(t), r.topic, func(ctx context.Context, m *pubsub.Message) error {
		r.record(name, m)
		if h != nil {
			return h(ctx, m)
		}
		return nil
	}, opts...)
	require.NoError(t, err)
	return s
}

// waitRan waits until the named subscribers ran want split messages in all.
func (r *splitRig) waitRan(t *testing.T, want int, names ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := 0
		for _, n := range names {
			got += len(r.of(n))
		}
		if got >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v ran %d split messages, want %d", names, got, want)
		}
		time.Sleep(5 * time.Millisecond) // polling for the condition, with a deadline
	}
}

// assertPrefix checks a broadcast subscriber got a prefix of the batch's
// count messages, in order, with no gap.
func assertPrefix(t *testing.T, got []string, count int, name string) {
	t.Helper()
	for i, tag := range got {
		if !assert.Equal(t, splitTag(i), tag, "%s ran %v: not the batch's messages in order", name, got) {
			return
		}
	}
	assert.LessOrEqual(t, len(got), count, "%s ran %v", name, got)
}

// assertListedOnce checks no subscriber is listed twice in ack.Failures.
func assertListedOnce(t *testing.T, ack pubsub.PublishAck) {
	t.Helper()
	seen := map[pubsub.SubscriberID]bool{}
	for _, f := range ack.Failures {
		assert.False(t, seen[f.Subscriber], "%s listed twice: %+v", f.Subscriber, ack)
		seen[f.Subscriber] = true
	}
}

// heldMember subscribes X, a member of group g on h2 with a mailbox of one
// batch that holds each "fill" until release, and Y, a member on h0; it
// then publishes fills until X runs one and holds one (its mailbox full).
func (r *splitRig) heldMember(t *testing.T) (release func()) {
	t.Helper()
	held := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release)
	fills := make(chan struct{}, 64)
	fill := func(m *pubsub.Message) {
		if string(m.Data) == "fill" {
			fills <- struct{}{}
		}
	}
	r.subscribe(t, 2, "X", func(_ context.Context, m *pubsub.Message) error {
		fill(m)
		if string(m.Data) == "fill" {
			<-held
		}
		return nil
	}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	r.subscribe(t, 0, "Y", func(_ context.Context, m *pubsub.Message) error { fill(m); return nil }, pubsub.WithGroup("g"))
	for i := range 8 {
		_, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, []pubsub.Outgoing{{Data: []byte("fill")}}, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err, i)
	}
	for range 7 { // X runs one and holds one
		select {
		case <-fills:
		case <-time.After(10 * time.Second):
			t.Fatal("fills not all placed")
		}
	}
	return release
}

// A split batch whose group shares for X all fail MailboxFull: each chunk's
// share is re-routed to Y. The merged ack counts the group once and the
// broadcast subscriber once, with no failure; the group ran every message
// once, and B got every chunk in order.
func TestSplitBatchGroupSharesReroutedFromAFullMailbox(t *testing.T) {
	r := newSplitRig(t, "split-full", nil)
	r.subscribe(t, 2, "B", nil)
	release := r.heldMember(t)
	const count = 6
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	t.Logf("ack %+v; X %v Y %v", ack, r.of("X"), r.of("Y"))
	assert.Equal(t, 2, ack.Delivered, "%+v", ack)
	assert.Empty(t, ack.Failures)
	release()
	assertPrefix(t, r.of("B"), count, "B")
	assert.Len(t, r.of("B"), count)
	for i := range count {
		assert.Equal(t, 1, r.groupRuns("X", "Y")[splitTag(i)], "group runs of %s: X %v Y %v", splitTag(i), r.of("X"), r.of("Y"))
	}
	assertPrefix(t, r.of("Y"), count, "Y") // every share re-routed to Y, in order
}

// The same with three messages to a chunk, so a member gets a share of
// two or one message in each: X, the member on h2, ends its subscription
// while it runs its first split message. The rest of its share is
// re-routed (it ran part of it), and later chunks find it gone. The group
// runs every message at most once (at-most-once topic), is counted
// Delivered only if it ran every one, and is listed once at most.
func TestSplitBatchGroupMemberEndsMidChunk(t *testing.T) {
	r := newSplitRig(t, "split-ends", nil)
	r.subscribe(t, 2, "B", nil)
	var once sync.Once
	unsub := make(chan error, 1)
	self := make(chan *pubsub.Subscription, 1)
	self <- r.subscribe(t, 2, "X", func(ctx context.Context, m *pubsub.Message) error {
		if m.Data[0] != 's' {
			return nil
		}
		once.Do(func() {
			x := <-self
			go func() { unsub <- x.Unsubscribe(context.Background()) }()
			<-x.Done()
		})
		return nil
	}, pubsub.WithGroup("g"))
	r.subscribe(t, 0, "Y", nil, pubsub.WithGroup("g"))
	// Keyless round robin keeps its place across batches: one message
	// first, so that chunk 0's share for X is two messages, not one.
	_, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, []pubsub.Outgoing{{Data: []byte("warm")}})
	require.NoError(t, err)
	const count = 9
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 3))
	require.NoError(t, err)
	require.NoError(t, <-unsub)
	require.Equal(t, []string{splitTag(0)}, r.of("X"), "X ran the first of its two-message share and ended")
	t.Logf("ack %+v; X %v Y %v", ack, r.of("X"), r.of("Y"))
	assertListedOnce(t, ack)
	assertPrefix(t, r.of("B"), count, "B")
	assert.Len(t, r.of("B"), count)
	runs := r.groupRuns("X", "Y")
	all := true
	for i := range count {
		assert.LessOrEqual(t, runs[splitTag(i)], 1, "group runs of %s: X %v Y %v", splitTag(i), r.of("X"), r.of("Y"))
		all = all && runs[splitTag(i)] == 1
	}
	groupFailed := false
	for _, f := range ack.Failures {
		if f.Group == "g" {
			groupFailed = true
		} else {
			t.Errorf("a broadcast subscriber listed: %+v", ack)
		}
	}
	if all {
		assert.Equal(t, 2, ack.Delivered, "the group ran every message: %+v", ack)
	} else {
		assert.Equal(t, 1, ack.Delivered, "the group missed a message: %+v", ack)
		assert.True(t, groupFailed, "the group missed a message, not listed: %+v", ack)
	}
}

// shortPublisher gives h0 (the publisher) timeouts shorter than the
// owner's: each chunk is answered at h0's deadline when a subscriber has
// not reported by then. The others wait 3 s for a subscriber.
func shortPublisher(i int) []pubsub.Option {
	if i == 0 {
		return []pubsub.Option{pubsub.WithSubscriberTimeout(250 * time.Millisecond), pubsub.WithRequestTimeout(250 * time.Millisecond)}
	}
	return []pubsub.Option{pubsub.WithSubscriberTimeout(3 * time.Second)}
}

// gate holds the handlers that wait on it until it is opened (at the
// test's cleanup at the latest).
type gate struct {
	ch   chan struct{}
	once sync.Once
}

func newGate(t *testing.T) *gate {
	g := &gate{ch: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

func (g *gate) handler(ctx context.Context, m *pubsub.Message) error {
	<-g.ch
	return nil
}

// endMarker publishes a last small message at AckDelivered from h1 (the
// owner, with the longer timeouts) and waits for its ack: a subscriber
// that got it has run everything handed to it before.
func (r *splitRig) endMarker(t *testing.T) pubsub.PublishAck {
	t.Helper()
	ack, err := r.nodes[1].PublishMessages(ctxT(t), r.topic, []pubsub.Outgoing{{Data: []byte("end")}})
	require.NoError(t, err)
	return ack
}

// A split batch answered at the publisher's deadline, chunk by chunk,
// while X, a member of group g on h2, holds what it gets: round robin
// gives X every other chunk, each answered before X's node reports, X
// listed Timeout (outcome unknown). X is listed once, the group is not
// counted Delivered, the broadcast subscriber B (on the owner's node) is. X is not skipped for
// the later chunks (groups never are): once let go it runs both its
// shares, in order, and the group runs every message once.
func TestSplitBatchEarlyAnswersWithAHeldGroupMember(t *testing.T) {
	r := newSplitRig(t, "split-slow", shortPublisher)
	r.subscribe(t, 1, "B", nil) // not on X's node, which reports X and B together
	held := newGate(t)
	x := r.subscribe(t, 2, "X", held.handler, pubsub.WithGroup("g"))
	r.subscribe(t, 0, "Y", nil, pubsub.WithGroup("g"))
	const count = 4
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	held.open()
	t.Logf("ack %+v; X %v Y %v", ack, r.of("X"), r.of("Y"))
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: x.ID(), Status: pubsub.Timeout, Group: "g"}}, ack.Failures)
	assert.Equal(t, 1, ack.Delivered, "only B ran every chunk by the answer: %+v", ack)
	r.waitRan(t, count, "X", "Y")
	assertPrefix(t, r.of("B"), count, "B")
	assert.Len(t, r.of("B"), count)
	for i := range count {
		assert.Equal(t, 1, r.groupRuns("X", "Y")[splitTag(i)], "group runs of %s: X %v Y %v", splitTag(i), r.of("X"), r.of("Y"))
	}
	xs := r.of("X")
	assert.Len(t, xs, count/2, "X, listed Timeout unreported, got no later share: %v", xs)
	for i := 1; i < len(xs); i++ {
		assert.Less(t, xs[i-1], xs[i], "X ran its shares out of order: %v", xs)
	}
}

// Both at once: B, a broadcast subscriber, and X, a group member, both on
// h2 with a mailbox of one batch, hold what they get; each chunk is
// answered at h0's deadline. B is listed Timeout (unreported) for chunk 0
// and still gets chunk 1 (queued in its mailbox); chunk 2 finds its
// mailbox full, its node reports MailboxFull, and from then on it is
// skipped: it runs a prefix of the batch, in order, with no gap. X's
// shares go on until its mailbox is full and are re-routed to Y from
// then. Each is listed once; nothing is counted Delivered; the group runs
// every message once.
func TestSplitBatchEarlyAnswersThenFullMailboxes(t *testing.T) {
	r := newSplitRig(t, "split-early-full", shortPublisher)
	held := newGate(t)
	b := r.subscribe(t, 2, "B", held.handler, pubsub.WithSubscriptionMailbox(1))
	x := r.subscribe(t, 2, "X", held.handler, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	r.subscribe(t, 0, "Y", nil, pubsub.WithGroup("g"))
	const count = 6
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	held.open()
	t.Logf("ack %+v; B %v X %v Y %v", ack, r.of("B"), r.of("X"), r.of("Y"))
	assertListedOnce(t, ack)
	assert.Zero(t, ack.Delivered, "neither B nor the group ran every chunk by the answer: %+v", ack)
	listed := map[pubsub.SubscriberID]pubsub.DeliveryFailure{}
	for _, f := range ack.Failures {
		listed[f.Subscriber] = f
	}
	assert.Equal(t, pubsub.DeliveryFailure{Subscriber: b.ID(), Status: pubsub.Timeout}, listed[b.ID()])
	assert.Equal(t, pubsub.DeliveryFailure{Subscriber: x.ID(), Status: pubsub.Timeout, Group: "g"}, listed[x.ID()])
	end := r.endMarker(t)
	t.Logf("end %+v; B %v X %v Y %v", end, r.of("B"), r.of("X"), r.of("Y"))
	r.waitRan(t, count, "X", "Y")
	r.waitRan(t, 2, "B") // chunk 1 runs once chunk 0's handler returns, on B's own schedule
	assert.Equal(t, []string{splitTag(0), splitTag(1)}, r.of("B"), "B: chunk 0 running, chunk 1 queued, then MailboxFull and skipped")
	for i := range count {
		assert.Equal(t, 1, r.groupRuns("X", "Y")[splitTag(i)], "group runs of %s: X %v Y %v", splitTag(i), r.of("X"), r.of("Y"))
	}
	xs := r.of("X")
	for i := 1; i < len(xs); i++ {
		assert.Less(t, xs[i-1], xs[i], "X ran its shares out of order: %v", xs)
	}
}

// A BatchingProducer's batch split in chunks (numbered batch<<16|chunk)
// with X's mailbox full: each chunk's share for X is re-routed to Y (a
// re-routed share keeps its own mark, apart from the producer's order).
// Every future is Delivered to B and the group, the group runs each
// message once, Y and B in order.
func TestSplitProducerBatchGroupSharesReroutedFromAFullMailbox(t *testing.T) {
	r := newSplitRig(t, "split-prod-full", nil)
	r.subscribe(t, 2, "B", nil)
	release := r.heldMember(t)
	p, err := pubsub.NewBatchingProducer(r.nodes[0], r.topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		MaxBatchBytes: 4 * r.nodes[0].MaxMessageSize()})
	require.NoError(t, err)
	defer func() { _ = p.Close(ctxT(t)) }()
	const count = 6
	var futs []*pubsub.Produced
	for _, m := range r.splitBatch(count, 1) {
		futs = append(futs, p.Produce(ctxT(t), m.Data))
	}
	require.NoError(t, p.Flush(ctxT(t)))
	for i, f := range futs {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, i)
		assert.Equal(t, 2, ack.Delivered, "message %d: %+v", i, ack)
		assert.Empty(t, ack.Failures, "message %d", i)
	}
	release()
	t.Logf("B %v X %v Y %v", r.of("B"), r.of("X"), r.of("Y"))
	assert.Len(t, r.of("B"), count)
	assertPrefix(t, r.of("B"), count, "B")
	assertPrefix(t, r.of("Y"), count, "Y")
	for i := range count {
		assert.Equal(t, 1, r.groupRuns("X", "Y")[splitTag(i)], "group runs of %s", splitTag(i))
	}
}

// Early answers, then the held member leaves: X holds its first share of
// a split batch answered chunk by chunk at the publisher's deadline, its
// second waiting in its mailbox. After the publisher has its answer, X
// unsubscribes and is let go: the share it never started is answered
// SubscriberGone and re-routed to Y. On this at-most-once topic the
// group runs every message exactly once.
func TestSplitBatchEarlyAnswersThenTheHeldMemberLeaves(t *testing.T) {
	r := newSplitRig(t, "split-early-leave", shortPublisher)
	held := newGate(t)
	x := r.subscribe(t, 2, "X", held.handler, pubsub.WithGroup("g"))
	r.subscribe(t, 0, "Y", nil, pubsub.WithGroup("g"))
	const count = 4
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	t.Logf("ack %+v; X %v Y %v", ack, r.of("X"), r.of("Y"))
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: x.ID(), Status: pubsub.Timeout, Group: "g"}}, ack.Failures)
	assert.Zero(t, ack.Delivered)
	require.Len(t, r.of("X"), 1, "X holds its first share")
	unsub := make(chan error, 1)
	go func() { unsub <- x.Unsubscribe(ctxT(t)) }()
	<-x.Done()
	held.open()
	require.NoError(t, <-unsub)
	r.waitRan(t, count, "X", "Y")
	t.Logf("X %v Y %v", r.of("X"), r.of("Y"))
	for i := range count {
		assert.Equal(t, 1, r.groupRuns("X", "Y")[splitTag(i)], "group runs of %s: X %v Y %v", splitTag(i), r.of("X"), r.of("Y"))
	}
}
