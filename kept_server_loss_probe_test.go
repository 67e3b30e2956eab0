package pubsub_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Kept copies through the loss of a NATS server: a BatchingProducer (four
// batches in flight) on a node subscribed to its topic, whose owner is
// remote, while the server of the publisher's node, or of the owner's,
// shuts down and the node's connection moves to another server. Copies
// live in the publisher's memory, so the move does not lose them. A
// delivery lost in the dead server is re-sent (at-least-once), or the ack
// lists the subscriber as Timeout; a re-sent copy that arrives after a
// later batch is dropped and listed OutOfOrder (order comes before
// redelivery, README "Guarantees"). So: every accepted message reached
// every subscriber or its ack lists that subscriber, nothing runs twice or
// out of order, nobody is evicted, and once the node has moved every
// subscriber, the publisher's own included, gets every later message.
//
// Here the copies must survive their publisher's connection moving, on an
// at-least-once topic; TestSoakKeptCopies runs the owner's server and
// at-most-once too.
func TestKeptCopiesThroughServerLoss(t *testing.T) {
	keptServerLoss(t, []int{0}, []pubsub.DeliveryMode{pubsub.AtLeastOnce}, []pubsub.AckLevel{pubsub.AckDelivered})
}

// keptServerLoss runs keptServerLossProbe losing each of servers (0: the
// publisher's, 1: the owner's) in each of modes, at each of levels.
func keptServerLoss(t *testing.T, servers []int, modes []pubsub.DeliveryMode, levels []pubsub.AckLevel) {
	for _, server := range servers {
		for _, mode := range modes {
			for _, level := range levels {
				lost := map[int]string{0: "publisher's server", 1: "owner's server"}[server]
				t.Run(fmt.Sprintf("%s/%v/%v", lost, mode, level), func(t *testing.T) { keptServerLossProbe(t, server, mode, level) })
			}
		}
	}
}

// At AckAccepted the acks list no delivery: what a subscriber lacks is
// then checked against the owner's DeliveryFailed events for it, by count.
func keptServerLossProbe(t *testing.T, server int, mode pubsub.DeliveryMode, level pubsub.AckLevel) {
	p := newKeptProbe()
	opts := append(slices.Clone(fast), pubsub.WithHooks(p),
		pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))
	c := testcluster.New(t, 3, 3, opts...)
	c.WaitConverged(t, 10*time.Second)
	topic := keptTopic("kept-server-loss", []string{"n0", "n1", "n2"}, "n1", []string{"n0", "n1", "n2"}, "n1")
	var subs []pubsub.SubscriberID
	for _, n := range c.Nodes {
		p.watch(t, n)
		subs = append(subs, subscribe(t, n, topic, p.handler).ID())
	}
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{
		BatchSize: 5, AckLevel: level,
		// A batch whose attempt timed out in the dead server is sent again:
		// its outcome is unknown, and no subscriber runs a copy of a batch
		// it already ran.
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(5 * time.Millisecond) },
	})
	require.NoError(t, err)
	var failedMu sync.Mutex
	failed := map[pubsub.SubscriberID]int{} // messages, by the owner's DeliveryFailed events
	t.Cleanup(c.Nodes[1].Events().Subscribe(func(e pubsub.Event) {
		if ev, ok := e.(pubsub.DeliveryFailed); ok {
			failedMu.Lock()
			failed[ev.Subscriber] += ev.Messages
			failedMu.Unlock()
		}
	}))
	before := c.Nodes[0].Stats()
	moved := c.Conns[server].Stats().Reconnects
	ctx := ctxT(t)
	st := startKeptStream(ctx, prod, 20)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return st.produced() >= 100 }, "produced %d", st.produced())
	c.ShutdownServer(server)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return c.Conns[server].Stats().Reconnects > moved },
		"node %s did not reconnect to another server", c.Nodes[server].ID())
	after := st.produced() // the first message produced once the node had moved
	testcluster.WaitFor(t, 15*time.Second, func() bool { return st.produced() >= after+150 }, "produced %d after the move", st.produced()-after)
	futs := st.end()
	require.NoError(t, prod.Close(ctx))

	stats := c.Nodes[0].Stats()
	t.Logf("kept copies: %d hits, %d misses", stats.KeptCopyHits-before.KeptCopyHits, stats.KeptCopyMisses-before.KeptCopyMisses)
	assert.NotZero(t, stats.KeptCopyHits-before.KeptCopyHits, "no delivery from a kept copy: the probe probed nothing")
	// Each accepted message is owed to every subscriber its ack does not
	// list (at AckAccepted, to every subscriber but as many as the owner's
	// events say failed); from a little after the move on (batches in
	// flight at the move may still fail), to every subscriber.
	owed := map[pubsub.SubscriberID][]int{}
	listed := 0
	var accepted []int
	for i, f := range futs {
		ack, err, done := f.Result()
		require.True(t, done, "P:%d not done", i)
		if err != nil || ack.Status != pubsub.Accepted {
			continue
		}
		accepted = append(accepted, i)
		inAck := map[pubsub.SubscriberID]bool{}
		for _, fl := range ack.Failures {
			inAck[fl.Subscriber] = true
			listed++
		}
		if i >= after+50 {
			assert.Empty(t, ack.Failures, "P:%d, produced well after the move, failed somewhere: %+v", i, ack)
		}
		for _, s := range subs {
			if !inAck[s] && (level == pubsub.AckDelivered || i >= after+50) {
				owed[s] = append(owed[s], i)
			}
		}
	}
	problems := func() (m []string) {
		for _, s := range subs {
			for _, i := range owed[s] {
				if !p.has(s, i) {
					m = append(m, fmt.Sprintf("%s lacks P:%d", s, i))
				}
			}
			if level == pubsub.AckDelivered {
				continue
			}
			lack := 0
			for _, i := range accepted {
				if !p.has(s, i) {
					lack++
				}
			}
			failedMu.Lock()
			if lack > failed[s] {
				m = append(m, fmt.Sprintf("%s lacks %d accepted messages, the owner reported %d failed", s, lack, failed[s]))
			}
			failedMu.Unlock()
		}
		return m
	}
	for end := time.Now().Add(10 * time.Second); len(problems()) > 0 && time.Now().Before(end); {
		<-time.After(20 * time.Millisecond)
	}
	m := problems()
	assert.Empty(t, m[:min(len(m), 20)], "accepted messages missing at subscribers (%d)", len(m))
	p.mu.Lock()
	defer p.mu.Unlock()
	failedMu.Lock()
	defer failedMu.Unlock()
	t.Logf("produced %d (%d after the move), accepted %d; failures listed %d; failed at the owner %v; not run %v",
		len(futs), len(futs)-after, len(accepted), listed, failed, p.notRun)
	assert.Empty(t, p.faults[:min(len(p.faults), 20)], "order or duplicate faults (%d)", len(p.faults))
	assert.Empty(t, p.evicted, "evictions")
}
