package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// splitMsg is message i of a split-retry test: about a third of the node's
// MaxMessageSize, so three make one request and a batch of six is split
// into two chunks by Node.PublishBatch.
func splitMsg(n *pubsub.Node, i int) []byte {
	b := make([]byte, n.MaxMessageSize()/3-64)
	copy(b, fmt.Sprintf("m%05d", i))
	return b
}

// A BatchingProducer batch larger than the node's MaxMessageSize (its
// MaxBatchBytes set higher) is split into chunks numbered batch<<16|chunk.
// The owner crashes after chunk 0 {m0 m1 m2} reached the subscribers on n0
// and n2; the attempt times out (outcome unknown) and is retried. m0's
// context ended meanwhile, and the retry left it out, so its chunks became
// {m1 m2 m3} {m4 m5}: n0's and n2's subscribers took chunk 0 of the retry
// for the chunk they had run and answered Delivered without running m3.
// m3's ack counted them delivered; nobody ever ran it.
func TestSplitProducerBatchRetryDoesNotClaimUnrunMessages(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "split-retry")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })

	var mu sync.Mutex
	ran := map[string]map[string]int{} // node -> message -> runs
	got := make(chan struct{}, 64)
	subs := map[string]bool{}
	for _, k := range []int{0, 2} {
		node := c.Nodes[k].ID()
		ran[node] = map[string]int{}
		s := subscribe(t, c.Nodes[k], topic, func(ctx context.Context, m *pubsub.Message) error {
			mu.Lock()
			ran[node][string(m.Data[:6])]++
			mu.Unlock()
			got <- struct{}{}
			return nil
		})
		subs[s.ID().String()] = true
	}
	// The owner's own subscriber holds chunk 0, so the owner cannot answer
	// it before it crashes (and chunk 1 is never sent).
	subscribe(t, c.Nodes[1], topic, func(ctx context.Context, m *pubsub.Message) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		MaxBatchBytes:  4 * c.Nodes[0].MaxMessageSize(),
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	futs, cancel, flushed := produceSplitBatch(t, p, c.Nodes[0])

	// n0's and n2's subscribers run chunk 0: three messages each.
	for range 6 {
		select {
		case <-got:
		case <-time.After(10 * time.Second):
			t.Fatal("chunk 0 never reached n0's and n2's subscribers")
		}
	}
	cancel() // m0's caller gives up, after m0 was delivered
	c.Crash(1)

	for i, f := range futs {
		ack, err := f.Wait(ctxT(t))
		t.Logf("m%d: ack %+v err %v", i, ack, err)
		if err != nil || ack.Status != pubsub.Accepted {
			continue // outcome unknown or failed: nothing claimed
		}
		failed := map[string]bool{}
		for _, fl := range ack.Failures {
			failed[fl.Subscriber.String()] = true
		}
		mu.Lock()
		for node, runs := range ran {
			if runs[fmt.Sprintf("m%05d", i)] == 0 && ack.Delivered >= 2 && len(failed) == 0 {
				t.Errorf("m%d: ack %+v counts %d subscribers delivered with no failure, but %s's subscriber never ran it",
					i, ack, ack.Delivered, node)
			}
		}
		mu.Unlock()
	}
	if err := <-flushed; err != nil {
		t.Logf("flush: %v", err)
	}
}

// The same with a retry to the same owner: chunk 0 {m0 m1 m2} of a split
// producer batch ran at n2's subscriber, but the owner's answer was held
// by a one-way stall of the route back to the producer's node, so the
// attempt timed out (outcome unknown). m0's context had ended; the retry
// left it out and went to the same owner as {m1 m2 m3} {m4 m5}, and n2's
// subscriber answered chunk 0 with the outcome of the chunk it ran:
// Delivered, for m3, which it never ran.
func TestSplitProducerBatchRetryToTheSameOwnerDoesNotClaimUnrunMessages(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...),
		pubsub.WithMemberTimeout(20*time.Second))...) // the stall changes no view
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[1], "split-retry-same")

	var mu sync.Mutex
	ran := map[string]int{}
	entered := make(chan struct{})
	proceed := make(chan struct{})
	got := make(chan struct{}, 64)
	var once sync.Once
	subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		once.Do(func() { close(entered); <-proceed })
		mu.Lock()
		ran[string(m.Data[:6])]++
		mu.Unlock()
		got <- struct{}{}
		return nil
	})
	var failures atomic.Int32
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		MaxBatchBytes: 4 * c.Nodes[0].MaxMessageSize(), PublishTimeout: 3 * time.Second,
		OnPublishError: func(int, error) pubsub.ErrorDecision {
			if failures.Add(1) == 1 {
				c.HealAll() // the answer was lost; the retry goes through
			}
			return pubsub.RetryBatch(0)
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	futs, cancel, flushed := produceSplitBatch(t, p, c.Nodes[0])

	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("chunk 0 never reached n2's subscriber")
	}
	c.StallRoute(1, 0) // the owner's answer to n0 is held
	close(proceed)
	for range 3 {
		<-got // n2's subscriber ran chunk 0
	}
	cancel() // m0's caller gives up, after m0 was delivered

	for i, f := range futs {
		ack, err := f.Wait(ctxT(t))
		t.Logf("m%d: ack %+v err %v", i, ack, err)
		if err != nil || ack.Status != pubsub.Accepted {
			continue
		}
		mu.Lock()
		if ran[fmt.Sprintf("m%05d", i)] == 0 && ack.Delivered == 1 && len(ack.Failures) == 0 {
			t.Errorf("m%d: ack %+v counts n2's subscriber delivered, but it never ran it", i, ack)
		}
		mu.Unlock()
	}
	if err := <-flushed; err != nil {
		t.Logf("flush: %v", err)
	}
	if failures.Load() == 0 {
		t.Fatal("no attempt failed: the stall did not hold the answer")
	}
}

// splitMessages is how many messages the split-batch tests produce: six of
// a third of MaxMessageSize each, two chunks of three.
const splitMessages = 6

// produceSplitBatch produces the test's six messages through p as one
// batch (Flush sends it, reported on flushed) and returns their futures and
// the cancel of the first message's context.
func produceSplitBatch(t *testing.T, p *pubsub.BatchingProducer, n *pubsub.Node) ([]*pubsub.Produced, context.CancelFunc, <-chan error) {
	m0ctx, cancel := context.WithCancel(ctxT(t))
	futs := []*pubsub.Produced{p.Produce(m0ctx, splitMsg(n, 0))}
	for i := 1; i < splitMessages; i++ {
		futs = append(futs, p.Produce(ctxT(t), splitMsg(n, i)))
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush(ctxT(t)) }() // one batch of all six
	return futs, cancel, flushed
}
