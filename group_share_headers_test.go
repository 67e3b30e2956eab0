package pubsub_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A member's own-share copy check (the producer's batch number and a
// fingerprint of the share) fingerprinted each message's data and key but
// not its header. A producer's batch of messages equal but for their
// headers, retried after the group changed (a member's node crashed with
// its share unrun, another member joined), is assigned anew: a surviving
// member given the crashed member's message, as many messages as it had
// the first time, answered "the same share again: Delivered" without
// running it, and the ack counted the group delivered for a message no
// member ran.
func TestGroupRetryAssignedAnewTellsSharesApartByHeader(t *testing.T) {
	leakcheck.Parallel(t)
	aHandled := &handledCounter{} // A's outcomes, on n0
	c := newCluster(t, 3, 3, pubsub.WithSubscriberTimeout(10*time.Second), aHandled.hook(), pubsub.WithSilentWaitForTest())
	topic := ownedBy(t, c.Nodes[1], "share-headers")
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock)

	var mu sync.Mutex
	ran := map[string][]string{} // header n -> live members that ran it
	record := func(name string) pubsub.Handler {
		return func(_ context.Context, m *pubsub.Message) error {
			mu.Lock()
			ran[m.Header.Get("n")] = append(ran[m.Header.Get("n")], name)
			mu.Unlock()
			return nil
		}
	}
	count := func(name string) int {
		mu.Lock()
		defer mu.Unlock()
		k := 0
		for _, at := range ran {
			for _, a := range at {
				if a == name {
					k++
				}
			}
		}
		return k
	}
	for k, name := range map[int]string{0: "A", 1: "B"} {
		s, err := c.Nodes[k].Subscribe(ctxT(t), topic, record(name), pubsub.WithGroup("g"))
		if err != nil {
			t.Fatal(err)
		}
		if name == "A" {
			id := s.ID()
			aHandled.id.Store(&id)
		}
	}
	// C, on n2, holds its share until its node crashes: it never runs it.
	var cGot atomic.Bool
	if _, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(ctx context.Context, _ *pubsub.Message) error {
		cGot.Store(true)
		select {
		case <-release:
		case <-ctx.Done():
		}
		return fmt.Errorf("not run")
	}, pubsub.WithGroup("g")); err != nil {
		t.Fatal(err)
	}
	// A broadcast subscriber holds the first batch, so the owner answers
	// no attempt of it until the test releases it: the producer retries.
	var slowOnce atomic.Bool
	subscribe(t, c.Nodes[0], topic, func(ctx context.Context, _ *pubsub.Message) error {
		if slowOnce.CompareAndSwap(false, true) {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	})

	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute,
		PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	const total = 3 // keyless, one per member; equal data, told apart by their headers
	var futs []*pubsub.Produced
	for i := range total {
		h := pubsub.Header{}
		h.Set("n", fmt.Sprint(i))
		futs = append(futs, p.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: []byte("same"), Header: h}))
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush(ctxT(t)) }()

	testcluster.WaitFor(t, 10*time.Second, func() bool { return count("A") == 1 && count("B") == 1 && cGot.Load() },
		"the first attempt did not reach every member")
	c.Crash(2)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return len(c.Nodes[1].Members()) == 2 }, "n2 never left the owner's view")
	// An attempt assigned over A and B alone (A gets two messages: not its
	// share, answered OutOfOrder) moves round robin on by one, so the
	// attempt after D joins gives A the crashed member's message.
	testcluster.WaitFor(t, 10*time.Second, func() bool { return slices.Contains(aHandled.statuses(), pubsub.OutOfOrder) },
		"no attempt was assigned over A and B alone (A handled %v)", aHandled.statuses())
	// D joins: a later attempt is assigned over A, B and D.
	if _, err := c.Nodes[1].Subscribe(ctxT(t), topic, record("D"), pubsub.WithGroup("g")); err != nil {
		t.Fatal(err)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return count("D") > 0 },
		"no attempt assigned after D joined reached D (%d retries)", retries.Load())
	unblock()
	ack, err := futs[0].Wait(ctxT(t))
	if ferr := <-flushed; ferr != nil {
		t.Logf("flush: %v", ferr)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("ack %+v err %v; %d retries; runs by header: %v", ack, err, retries.Load(), ran)
	if err != nil {
		return // outcome unknown: nothing claimed
	}
	for _, f := range ack.Failures {
		if f.Group == "g" {
			return // the group's failure is reported: nothing claimed
		}
	}
	for i := range total {
		if len(ran[fmt.Sprint(i)]) == 0 {
			t.Errorf("ack %+v counts the group delivered, but no live member ran the message with header n=%d", ack, i)
		}
	}
}
