package pubsub_test

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A producer batch whose attempts time out (a slow broadcast subscriber
// holds the owner's answer) and are retried through the same owner, on an
// at-most-once topic: the member given p1 has a full mailbox each time,
// so p1 is re-routed to the other member on every attempt. A re-route
// carried no producer number to answer a copy by, so that member ran p1
// once per attempt (6 times); it now answers a copy of the share it ran
// with its outcome.
func TestGroupRetriedBatchReroutedShareRunsOnce(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "reroute-retry")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	var mu sync.Mutex
	ran := map[string][]string{}
	record := func(id string, m *pubsub.Message) {
		mu.Lock()
		ran[string(m.Data)] = append(ran[string(m.Data)], id)
		mu.Unlock()
	}
	// X: a member stuck in its handler, one batch of mailbox.
	_, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		record("X", m)
		<-release
		return nil
	}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Nodes[0].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		record("Y", m)
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 { // fill X's mailbox
		if _, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("fill")}}, pubsub.WithAck(pubsub.AckAccepted)); err != nil {
			t.Fatal(i, err)
		}
	}
	// X's mailbox is full once a fill was re-routed to Y.
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Contains(ran["fill"], "Y")
	}, "no fill was re-routed from X's full mailbox to Y")
	var slowOnce atomic.Bool
	subscribe(t, c.Nodes[1], topic, func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data) != "fill" && slowOnce.CompareAndSwap(false, true) {
			<-ctx.Done()
		}
		return nil
	})
	var retries atomic.Int64
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 1, Linger: time.Minute, PublishTimeout: 300 * time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { retries.Add(1); return pubsub.RetryBatch(10 * time.Millisecond) }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctxT(t))
	futs := []*pubsub.Produced{p.Produce(ctxT(t), []byte("p0")), p.Produce(ctxT(t), []byte("p1"))}
	if err := p.Flush(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for _, f := range futs {
		ack, err := f.Wait(ctxT(t))
		t.Logf("ack %+v err %v", ack, err)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("retries %d ran p0 %v p1 %v", retries.Load(), ran["p0"], ran["p1"])
	if retries.Load() == 0 {
		t.Fatal("the batch was never retried: the test did not run what it names")
	}
	for _, m := range []string{"p0", "p1"} {
		if len(ran[m]) > 1 {
			t.Errorf("group ran %s %d times at %v; want at most once", m, len(ran[m]), ran[m])
		}
	}
}
