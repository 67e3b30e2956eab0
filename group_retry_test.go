package pubsub_test

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A BatchingProducer retries a batch whose owner crashed mid-batch
// (RetryBatch) under the same producer batch number. The new owner assigns
// the group's shares anew (the crashed node's member is gone, so its keys
// move; keyless messages restart the round robin), but each surviving
// member saw that batch number already and answered "the same batch
// again: the outcome it had" without running its new share. The ack then
// counted the group as Delivered, with no failure, for messages no member
// ever processed.
func TestGroupRetriedProducerBatchIsNotClaimedByAnEarlierShare(t *testing.T) {
	leakcheck.Parallel(t)
	groupRetriedBatch(t, pubsub.AtMostOnce)
}

// The same on an at-least-once topic: a member given another share of a
// batch number it ran runs it (repeats are allowed there, losses are not),
// so every message of the batch runs at some member.
func TestGroupRetriedProducerBatchRunsItsNewShareAtLeastOnce(t *testing.T) {
	leakcheck.Parallel(t)
	groupRetriedBatch(t, pubsub.AtLeastOnce)
}

func groupRetriedBatch(t *testing.T, mode pubsub.DeliveryMode) {
	c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))
	topic := ownedBy(t, c.Nodes[1], "probe-retry")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })

	var mu sync.Mutex
	ran := map[string][]string{} // message -> members that ran it
	blocked := make(chan struct{}, 1)
	record := func(node string) pubsub.Handler {
		return func(ctx context.Context, m *pubsub.Message) error {
			mu.Lock()
			ran[string(m.Data)] = append(ran[string(m.Data)], node)
			mu.Unlock()
			return nil
		}
	}
	for _, k := range []int{0, 2} {
		_, err := c.Nodes[k].Subscribe(ctxT(t), topic, record(c.Nodes[k].ID()), pubsub.WithGroup("g"))
		if err != nil {
			t.Fatal(err)
		}
	}
	// The owner's own member holds its share, so the owner cannot answer
	// before it crashes; it runs none of it.
	_, err := c.Nodes[1].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		select {
		case blocked <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return fmt.Errorf("not run")
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	var bmu sync.Mutex
	bcast := map[string]int{}
	subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		bmu.Lock()
		bcast[string(m.Data)]++
		bmu.Unlock()
		return nil
	})

	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	const total = 30
	var futs []*pubsub.Produced
	for i := range total {
		key := fmt.Sprintf("k%02d", i)
		if i%3 == 2 {
			key = "" // keyless: round robin
		}
		futs = append(futs, p.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i), Key: key}))
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush(ctxT(t)) }() // one batch of all 30

	// n0's and n2's members ran their shares; n1's member holds its own.
	select {
	case <-blocked:
	case <-time.After(10 * time.Second):
		t.Fatal("n1's member never got a share")
	}
	bcastAll := func() bool { bmu.Lock(); defer bmu.Unlock(); return len(bcast) == total }
	testcluster.WaitFor(t, 10*time.Second, bcastAll, "broadcast subscriber did not get the batch")
	// n0's and n2's members run their shares (already in their mailboxes)
	// whether or not n1 lives; n1's member holds its share.
	testcluster.WaitFor(t, 10*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(ran) > 0 },
		"no group member ran anything")
	c.Crash(1)

	ack, err := futs[0].Wait(ctxT(t))
	if err := <-flushed; err != nil {
		t.Logf("flush: %v", err)
	}
	t.Logf("ack %+v err %v", ack, err)
	if err != nil {
		return // rejected: the outcome is unknown, nothing claimed
	}
	groupFailed := false
	for _, f := range ack.Failures {
		if f.Group == "g" {
			groupFailed = true
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var missing, dup []string
	for i := range total {
		switch n := len(ran[string(msg(i))]); {
		case n == 0:
			missing = append(missing, string(msg(i)))
		case n > 1:
			dup = append(dup, fmt.Sprintf("%s:%v", msg(i), ran[string(msg(i))]))
		}
	}
	sort.Strings(missing)
	if mode == pubsub.AtLeastOnce {
		if len(missing) > 0 {
			t.Fatalf("at-least-once topic, ack %+v: no member ran %d messages: %v", ack, len(missing), missing)
		}
		return
	}
	if len(dup) > 0 {
		t.Errorf("at-most-once topic, messages run twice within the group: %v", dup)
	}
	if !groupFailed && len(missing) > 0 {
		t.Fatalf("ack %+v counts the group delivered with no group failure, but no member ran %d messages: %v",
			ack, len(missing), missing)
	}
}

// A producer's batch retried through the same owner after an unknown
// outcome (its attempt timed out at the producer while the owner waited
// for a slow subscriber) is assigned as it was the first time: the member
// that ran a keyless message gets it again and answers with its outcome.
// Round robin moving on between the attempts gave a one-message batch to
// another member each retry, which had not seen the batch and ran it: on
// an at-most-once topic the group ran it up to once per member.
func TestGroupRetrySameOwnerRunsAKeylessMessageOnce(t *testing.T) {
	leakcheck.Parallel(t)
	// The broadcast subscriber is slow on the first batch: the producer's
	// attempts time out and are retried meanwhile.
	c, topic, ran := groupRetryRig(t, "retry-same-owner", func(*pubsub.Message) bool { return true })
	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	ack, err := p.Produce(ctxT(t), []byte("m0")).Wait(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if retries.Load() == 0 {
		t.Fatalf("the batch was never retried (ack %+v): the test did not run what it names", ack)
	}
	if got := ran()["m0"]; len(got) != 1 {
		t.Fatalf("after %d retries the group ran the message %d times, at %v; want once", retries.Load(), len(got), got)
	}
}

// groupRetryRig is a group "g" with one member per node of a 3-node
// cluster, the topic owned by n1, recording the members that ran each
// message (by its first 2 bytes), and a broadcast subscriber on n2 that
// holds the first message slow matches for SubscriberTimeout (2 s): the
// owner's answer to that batch comes after a producer's PublishTimeout.
func groupRetryRig(t *testing.T, prefix string, slow func(m *pubsub.Message) bool) (*testcluster.Cluster, string, func() map[string][]string) {
	c := newCluster(t, 3, 3, pubsub.WithSilentWaitForTest())
	topic := ownedBy(t, c.Nodes[1], prefix)
	var mu sync.Mutex
	ran := map[string][]string{}
	for _, n := range c.Nodes {
		id := n.ID()
		_, err := n.Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
			mu.Lock()
			ran[string(m.Data[:2])] = append(ran[string(m.Data[:2])], id)
			mu.Unlock()
			return nil
		}, pubsub.WithGroup("g"))
		if err != nil {
			t.Fatal(err)
		}
	}
	var slowOnce atomic.Bool
	subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		if slow(m) && slowOnce.CompareAndSwap(false, true) {
			<-ctx.Done()
		}
		return nil
	})
	return c, topic, func() map[string][]string {
		mu.Lock()
		defer mu.Unlock()
		out := map[string][]string{}
		for k, v := range ran {
			out[k] = slices.Clone(v)
		}
		return out
	}
}

// A pipelined producer (MaxInFlight 4, the default) whose batches 1 and 2
// both time out retries batch 1 after batch 2 was assigned. The owner
// remembered where round robin started for the producer's last batch
// only, so batch 1 was assigned anew: with two one-message batches and
// three members, each retry gave its message to a member that had not run
// it, and the group ran each message two or three times on an at-most-once
// topic.
func TestGroupRetryOfAPipelinedBatchRunsAKeylessMessageOnce(t *testing.T) {
	leakcheck.Parallel(t)
	c, topic, ran := groupRetryRig(t, "retry-pipelined", func(m *pubsub.Message) bool { return string(m.Data) == "m1" })
	var retries atomic.Int64
	// BatchSize 1: m1 and m2 are batches 1 and 2, in flight side by side.
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 4, BatchSize: 1, PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	if _, err := p.Produce(ctxT(t), []byte("m0")).Wait(ctxT(t)); err != nil { // the first batch initializes alone
		t.Fatal(err)
	}
	f1 := p.Produce(ctxT(t), []byte("m1"))
	f2 := p.Produce(ctxT(t), []byte("m2"))
	for _, f := range []*pubsub.Produced{f1, f2} {
		if _, err := f.Wait(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	if retries.Load() == 0 {
		t.Fatal("no batch was retried: the test did not run what it names")
	}
	for m, at := range ran() {
		if len(at) != 1 {
			t.Errorf("after %d retries the group ran %s %d times, at %v; want once", retries.Load(), m, len(at), at)
		}
	}
}

// A producer batch split into two chunks (MaxBatchBytes above the node's
// MaxMessageSize) whose chunk 1 timed out after chunk 0 ran is retried
// from chunk 0, which was not the producer's last batch at the owner
// (chunk 1 was): it was assigned anew, and so was chunk 1 after it, and
// the group ran both messages twice on an at-most-once topic.
func TestGroupRetryOfASplitBatchRunsEachKeylessMessageOnce(t *testing.T) {
	leakcheck.Parallel(t)
	c, topic, ran := groupRetryRig(t, "retry-split", func(m *pubsub.Message) bool { return string(m.Data[:2]) == "m1" })
	var retries atomic.Int64
	n0 := c.Nodes[0]
	p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		MaxBatchBytes: 4 * n0.MaxMessageSize(), PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	msg := func(s string) []byte {
		b := make([]byte, n0.MaxMessageSize()*6/10) // one message per chunk
		copy(b, s)
		return b
	}
	futs := []*pubsub.Produced{p.Produce(ctxT(t), msg("m0")), p.Produce(ctxT(t), msg("m1"))}
	if err := p.Flush(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for _, f := range futs {
		if _, err := f.Wait(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	if retries.Load() == 0 {
		t.Fatal("the batch was never retried: the test did not run what it names")
	}
	for m, at := range ran() {
		if len(at) != 1 {
			t.Errorf("after %d retries the group ran %s %d times, at %v; want once", retries.Load(), m, len(at), at)
		}
	}
}
