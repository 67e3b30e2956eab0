package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Probes of kept copies (kept.go) on the paths kept_fault_probe_test.go
// does not take: a consumer group's re-routed share beside the publisher's
// broadcast subscriber, the publisher's node closing with deliveries of
// its copies in flight, and keys and headers (a Propagator's too) through
// a BatchingProducer's copies.

// A group member on the publisher's node unsubscribes partway through its
// share of a delivery naming the publisher's copy, so the owner re-routes
// the rest to the member on another node; and the other way round, the
// member elsewhere leaving and its rest re-routed to the publisher's node
// (a re-route carries the messages, never a copy). The group runs every
// message once, the broadcast subscriber on the publisher's node gets every
// message in order from the copies, and every ack counts the group and the
// broadcast subscriber with no failure.
func TestKeptCopyBesideAReroutedGroupShare(t *testing.T) {
	for _, mode := range []pubsub.DeliveryMode{pubsub.AtMostOnce, pubsub.AtLeastOnce} {
		for _, leaving := range []int{0, 2} { // 0: the publisher's node
			t.Run(fmt.Sprintf("%v/leaving-on-n%d", mode, leaving), func(t *testing.T) {
				c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))
				pub := c.Nodes[0]
				topic := ownedTopic(t, pub, "n1", "kept-reroute")
				ctx := ctxT(t)
				in := newGroupInbox()
				rec := newRecorder()
				broadcast := subscribe(t, pub, topic, rec.handler)
				started, release := make(chan struct{}), make(chan struct{})
				var once sync.Once
				free := func() { once.Do(func() { close(release) }) }
				t.Cleanup(free)
				var first atomic.Bool
				leaver, err := c.Nodes[leaving].Subscribe(ctx, topic, func(ctx context.Context, m *pubsub.Message) error {
					require.NoError(t, in.handler(ctx, m))
					if first.CompareAndSwap(false, true) {
						close(started) // it unsubscribes meanwhile
						<-release
					}
					return nil
				}, pubsub.WithGroup("g"))
				require.NoError(t, err)
				stayer, err := c.Nodes[2-leaving].Subscribe(ctx, topic, in.handler, pubsub.WithGroup("g"))
				require.NoError(t, err)
				before := pub.Stats()

				const batches, size = 5, 12
				var want []string
				batch := func(b int) [][]byte {
					var out [][]byte
					for i := range size {
						out = append(out, msg(b*size+i))
						want = append(want, string(msg(b*size+i)))
					}
					return out
				}
				type result struct {
					ack pubsub.PublishAck
					err error
				}
				done := make(chan result, 1)
				first0 := batch(0)
				go func() {
					ack, err := pub.PublishBatch(ctx, topic, first0)
					done <- result{ack, err}
				}()
				select {
				case <-started:
				case <-time.After(10 * time.Second):
					t.Fatal("the leaving member never started")
				}
				require.NoError(t, leaver.Unsubscribe(ctx))
				free()
				acks := []result{<-done}
				for b := 1; b < batches; b++ {
					ack, err := pub.PublishBatch(ctx, topic, batch(b))
					acks = append(acks, result{ack, err})
				}
				for b, r := range acks {
					require.NoError(t, r.err, "batch %d", b)
					assert.Equal(t, pubsub.Accepted, r.ack.Status, "batch %d: %+v", b, r.ack)
					assert.Equal(t, 2, r.ack.Delivered, "batch %d: the group once and the broadcast subscriber: %+v", b, r.ack)
					assert.Empty(t, r.ack.Failures, "batch %d", b)
				}
				testcluster.WaitFor(t, 5*time.Second, func() bool { return len(rec.of(broadcast.ID())) >= len(want) },
					"the broadcast subscriber got %d of %d", len(rec.of(broadcast.ID())), len(want))
				assert.Equal(t, want, rec.of(broadcast.ID()), "the broadcast subscriber on the publisher's node")
				require.Len(t, in.of(leaver.ID()), 1, "the leaving member ran a message after Unsubscribe returned")
				checkGroup(t, in, []*pubsub.Subscription{leaver, stayer}, want)
				st := pub.Stats()
				assert.Equal(t, uint64(batches), st.KeptCopyHits-before.KeptCopyHits, "deliveries from the kept copies")
				assert.Zero(t, st.KeptCopyMisses-before.KeptCopyMisses)
				assert.Zero(t, c.Nodes[1].Stats().Evictions)
			})
		}
	}
}

// The publisher's node closes while a BatchingProducer on it runs and the
// owner's deliveries naming its copies are on their way. Nothing panics or
// leaks (the cluster's cleanup checks goroutines), every future completes,
// the other node's subscriber gets every accepted message once, in order,
// and an AckDelivered ack that counts both subscribers with no failure
// means the publisher's own subscriber ran the message.
func TestKeptCopiesWhenThePublishersNodeCloses(t *testing.T) {
	for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
		t.Run(level.String(), func(t *testing.T) {
			p := newKeptProbe()
			c := newCluster(t, 3, 3, pubsub.WithHooks(p))
			pub := c.Nodes[0]
			topic := ownedTopic(t, pub, "n1", "kept-close")
			own := subscribe(t, pub, topic, p.handler).ID()
			other := subscribe(t, c.Nodes[2], topic, p.handler).ID()
			prod, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 5, AckLevel: level})
			require.NoError(t, err)
			ctx := ctxT(t)
			st := startKeptStream(ctx, prod, 40) // it ends once the node closed
			testcluster.WaitFor(t, 10*time.Second, func() bool { return st.produced() >= 150 && pub.Stats().KeptCopyHits > 0 },
				"produced %d, %d kept-copy hits", st.produced(), pub.Stats().KeptCopyHits)
			c.CloseNode(t, 0)
			futs := st.end()
			require.NoError(t, prod.Close(ctx))
			var accepted, closed, owed []int
			reasons := map[string]int{}
			for i, f := range futs {
				select {
				case <-f.Done():
				case <-time.After(10 * time.Second):
					t.Fatalf("P:%d's future not done after its node closed", i)
				}
				ack, err, _ := f.Result()
				reasons[fmt.Sprint(ack.Status, "/", ack.Reason)]++
				switch {
				case err == nil && ack.Status == pubsub.Accepted:
					accepted = append(accepted, i)
					if level == pubsub.AckDelivered && ack.Delivered == 2 && len(ack.Failures) == 0 {
						owed = append(owed, i)
					}
				case ack.Reason == pubsub.ReasonClosed:
					closed = append(closed, i)
				}
			}
			t.Logf("%d produced %v, own subscriber ran %d, the other %d", len(futs), reasons, p.count(own), p.count(other))
			testcluster.WaitFor(t, 5*time.Second, func() bool { return p.count(other) >= len(accepted) },
				"the other node's subscriber got %d of %d accepted", p.count(other), len(accepted))
			p.mu.Lock()
			defer p.mu.Unlock()
			assert.Empty(t, p.faults[:min(len(p.faults), 20)], "order or duplicate faults (%d)", len(p.faults))
			var lack []int
			for _, i := range accepted {
				if p.seen[other][i] == 0 {
					lack = append(lack, i)
				}
			}
			assert.Empty(t, lack[:min(len(lack), 20)], "the other node's subscriber lacks %d accepted messages", len(lack))
			lack = lack[:0]
			for _, i := range owed {
				if p.seen[own][i] == 0 {
					lack = append(lack, i)
				}
			}
			assert.Empty(t, lack[:min(len(lack), 20)], "%d acks counted the publisher's own subscriber, which did not run them", len(lack))
			for _, i := range closed {
				assert.Zero(t, p.seen[other][i], "P:%d completed ReasonClosed (never published) but was delivered", i)
			}
		})
	}
}

// Keys and headers through the kept path: a BatchingProducer's
// ProduceMessage and Produce on a node with a Propagator, whose topic's
// owner is remote and which subscribes to it. Its own subscriber gets each
// message's key, header and the Propagator's value from the copies exactly
// as the other node's subscriber gets them with the messages.
func TestKeptCopiesCarryKeysAndHeadersFromAProducer(t *testing.T) {
	prop := &testPropagator{}
	c := newCluster(t, 3, 3, pubsub.WithPropagator(prop))
	pub := c.Nodes[0]
	var mine, theirs envelopes
	for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
		t.Run(level.String(), func(t *testing.T) {
			topic := ownedTopic(t, pub, "n1", "kept-meta-"+level.String())
			mine, theirs = envelopes{}, envelopes{}
			subscribe(t, pub, topic, mine.handler)
			subscribe(t, c.Nodes[2], topic, theirs.handler)
			before := pub.Stats()
			prod, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 7, AckLevel: level})
			require.NoError(t, err)
			ctx := ctxT(t)
			const n = 90
			var futs []*pubsub.Produced
			want := make([]received, n)
			for i := range n {
				data := fmt.Sprint("P:", i)
				traced := context.WithValue(ctx, traceKey{}, fmt.Sprint("t", i))
				want[i] = received{data: data, publisher: pub.ID()}
				switch i % 4 {
				case 0: // key, header and the Propagator's
					want[i].key, want[i].trace = fmt.Sprint("k", i%5), fmt.Sprint("t", i)
					want[i].header = pubsub.Header{"h": {strconv.Itoa(i), "second"}, "trace": {want[i].trace}}
					futs = append(futs, prod.ProduceMessage(traced, pubsub.Outgoing{Data: []byte(data), Key: want[i].key, Header: pubsub.Header{"h": {strconv.Itoa(i), "second"}}}))
				case 1: // a header alone, nothing injected
					want[i].header = pubsub.Header{"same": {"v"}}
					futs = append(futs, prod.ProduceMessage(ctx, pubsub.Outgoing{Data: []byte(data), Header: pubsub.Header{"same": {"v"}}}))
				case 2: // plain bytes, the Propagator's header
					want[i].trace = fmt.Sprint("t", i)
					want[i].header = pubsub.Header{"trace": {want[i].trace}}
					futs = append(futs, prod.Produce(traced, []byte(data)))
				case 3: // nothing at all
					futs = append(futs, prod.Produce(ctx, []byte(data)))
				}
			}
			require.NoError(t, prod.Close(ctx))
			for i, f := range futs {
				ack, err := f.Wait(ctx)
				require.NoError(t, err, "P:%d", i)
				require.Equal(t, pubsub.Accepted, ack.Status, "P:%d", i)
				if level == pubsub.AckDelivered {
					assert.Equal(t, 2, ack.Delivered, "P:%d: %+v", i, ack)
				}
			}
			testcluster.WaitFor(t, 5*time.Second, func() bool { return len(mine.all()) >= n && len(theirs.all()) >= n },
				"the subscribers got %d and %d of %d", len(mine.all()), len(theirs.all()), n)
			for name, got := range map[string][]received{"publisher's node": mine.all(), "other node": theirs.all()} {
				require.Len(t, got, n, name)
				for i := range got {
					if len(got[i].header) == 0 {
						got[i].header = nil
					}
					assert.Equal(t, want[i], got[i], "%s: message %d", name, i)
				}
			}
			st := pub.Stats()
			assert.NotZero(t, st.KeptCopyHits-before.KeptCopyHits, "no delivery from a kept copy: the probe probed nothing")
			assert.Zero(t, st.KeptCopyMisses-before.KeptCopyMisses)
		})
	}
}

// The publisher's node cut off past MemberTimeout while its producer runs
// and the owner's deliveries naming its copies are in flight, then
// replaced by a node with its ID (its own subscriber and producer), then
// healed. The newer incarnation runs none of the older one's deliveries
// (it has none of its copies, and answers a delivery for the older one
// SubscriberGone), nothing crashes, and an AckDelivered ack that counts
// both subscribers with no failure means each ran the message.
func TestKeptCopiesOfAReplacedPublisher(t *testing.T) {
	leakcheck.Parallel(t)
	// At-most-once in TestSoakKeptCopies, for time (held as well).
	t.Run(pubsub.AtLeastOnce.String(), func(t *testing.T) { keptReplacedProbe(t, pubsub.AtLeastOnce) })
}

func keptReplacedProbe(t *testing.T, mode pubsub.DeliveryMode) {
	p := newKeptProbe()
	opts := append(slices.Clone(fast), pubsub.WithHooks(p),
		pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))
	c := testcluster.NewFaulty(t, 3, 3, opts...)
	c.WaitConverged(t, 10*time.Second)
	older := c.Nodes[0]
	topic := keptTopic("kept-replaced", []string{"n0", "n1", "n2"}, "n1", []string{"n0", "n1", "n2"}, "n1")
	for _, n := range c.Nodes {
		p.watch(t, n)
	}
	olderSubscription := subscribe(t, older, topic, p.handler)
	olderSub := olderSubscription.ID()
	other := subscribe(t, c.Nodes[2], topic, p.handler).ID()
	ctx := ctxT(t)
	run := func(n *pubsub.Node, from int) (stop func() []*pubsub.Produced, produced func() int) {
		prod, err := pubsub.NewBatchingProducer(n, topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 5, AckLevel: pubsub.AckDelivered})
		require.NoError(t, err)
		var mu sync.Mutex
		var futs []*pubsub.Produced
		quit, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			for i := from; ; i++ {
				select {
				case <-quit:
					return
				default:
				}
				f := prod.Produce(ctx, fmt.Appendf(nil, "P:%d", i))
				mu.Lock()
				futs = append(futs, f)
				mu.Unlock()
				if _, err, done := f.Result(); done && errors.Is(err, pubsub.ErrClosed) {
					return // its node stopped
				}
				if i%20 == 19 {
					select {
					case <-f.Done():
					case <-quit:
						return
					}
				}
			}
		}()
		return func() []*pubsub.Produced {
				close(quit)
				<-done
				_ = prod.Close(ctx)
				mu.Lock()
				defer mu.Unlock()
				return futs
			}, func() int {
				mu.Lock()
				defer mu.Unlock()
				return len(futs)
			}
	}
	stopOlder, olderProduced := run(older, 0)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return olderProduced() >= 100 && older.Stats().KeptCopyHits > 0 },
		"produced %d", olderProduced())
	c.Client(0).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[1], "n0") && !hasMember(c.Nodes[2], "n0") }, "n0 not dropped")
	newer := c.AddNode(t, "n0", 0, opts...)
	p.watch(t, newer)
	newerSub := subscribe(t, newer, topic, p.handler).ID()
	stopNewer, newerProduced := run(newer, 100_000)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return newerProduced() >= 50 }, "the newer produced %d", newerProduced())
	c.HealAll()
	select {
	case <-olderSubscription.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the older incarnation still runs 10 s after the heal")
	}
	at := newerProduced()
	testcluster.WaitFor(t, 10*time.Second, func() bool { return newerProduced() >= at+50 }, "the newer produced %d after the heal", newerProduced()-at)
	olderFuts, newerFuts := stopOlder(), stopNewer()
	require.NoError(t, older.Close(ctx))

	check := func(name string, futs []*pubsub.Produced, own pubsub.SubscriberID) {
		reasons := map[string]int{}
		var owed []int
		for i, f := range futs {
			select {
			case <-f.Done():
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: future %d not done", name, i)
			}
			ack, err, _ := f.Result()
			reasons[fmt.Sprint(ack.Status, "/", ack.Reason)]++
			if err == nil && ack.Status == pubsub.Accepted && ack.Delivered == 2 && len(ack.Failures) == 0 {
				owed = append(owed, i)
			}
		}
		t.Logf("%s: %d produced %v", name, len(futs), reasons)
		base := 0
		if own == newerSub {
			base = 100_000
		}
		missing := func() (m []string) {
			for _, i := range owed {
				for _, s := range []pubsub.SubscriberID{own, other} {
					if !p.has(s, base+i) {
						m = append(m, fmt.Sprintf("%s lacks %d", s, base+i))
					}
				}
			}
			return m
		}
		deadline := time.Now().Add(5 * time.Second)
		for len(missing()) > 0 && time.Now().Before(deadline) {
			<-time.After(20 * time.Millisecond)
		}
		m := missing()
		assert.Empty(t, m[:min(len(m), 20)], "%s: %d acks counted deliveries that did not happen", name, len(m))
	}
	check("older", olderFuts, olderSub)
	check("newer", newerFuts, newerSub)
	p.mu.Lock()
	defer p.mu.Unlock()
	assert.Empty(t, p.faults[:min(len(p.faults), 20)], "order or duplicate faults (%d)", len(p.faults))
	var olders []int
	for i := range p.seen[newerSub] {
		if i < 100_000 {
			olders = append(olders, i)
		}
	}
	slices.Sort(olders)
	t.Logf("older ran %d, newer %d (%d of the older's), other %d; newer's copies: %d hits, %d misses; older's: %d hits, %d misses",
		len(p.got[olderSub]), len(p.got[newerSub]), len(olders), len(p.got[other]),
		newer.Stats().KeptCopyHits, newer.Stats().KeptCopyMisses, older.Stats().KeptCopyHits, older.Stats().KeptCopyMisses)
	assert.Empty(t, olders[:min(len(olders), 20)], "the newer incarnation ran %d of the older one's messages", len(olders))
	assert.Zero(t, newer.Stats().KeptCopyMisses, "the newer incarnation looked for copies it never kept")
}
