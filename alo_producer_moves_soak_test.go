//go:build soak

package pubsub_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// TestSoakAtLeastOnceProducerRetriesThroughOwnerMoves: a pipelined
// BatchingProducer retrying every failed attempt publishes to an
// AtLeastOnce topic while the topic's owner leaves, crashes, or comes back
// under its ID. Every future completes; an Accepted AckDelivered ack counts
// no subscriber that did not run the message and omits from Failures no
// live subscriber that did not; an Accepted message reaches every live
// subscriber not listed as failed (at any level, for a graceful leave); each
// subscriber runs the producer's messages in order, each once. At
// AckAccepted an ack lists no delivery failure (the owner answered before
// delivering): what a live subscriber lacks is checked against the
// owners' DeliveryFailed events instead, by count, as
// TestKeptCopiesThroughServerLoss does. A server killed under the owner
// loses deliveries in flight; their re-sends can reach a node behind a
// later batch of the pipelined producer and are dropped OutOfOrder
// (INTERNALS, Known limits), which the ack of an AckAccepted publish
// cannot list: a full soak failed so once (2026-12-02, server-killed,
// 20 deliveries) before the events counted.
func TestSoakAtLeastOnceProducerRetriesThroughOwnerMoves(t *testing.T) {
	for _, fault := range []string{"leave", "crash", "crash-restart", "leave-restart", "server-killed"} {
		for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
			t.Run(fault+"/"+level.String(), func(t *testing.T) {
				aloOwnerMoveProbe(t, fault, level)
			})
		}
	}
}

func aloOwnerMoveProbe(t *testing.T, fault string, level pubsub.AckLevel) {
	c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(atLeastOnce))
	topic := ownedBy(t, c.Nodes[2], "alo-move")
	rec := &aloRec{got: map[pubsub.SubscriberID][]int{}}
	live := []pubsub.SubscriberID{
		subscribe(t, c.Nodes[0], topic, rec.handler).ID(),
		subscribe(t, c.Nodes[1], topic, rec.handler).ID(),
	}
	subscribe(t, c.Nodes[2], topic, rec.handler) // on the owner: ends with it
	owners := watchDeliveryFailures(t, c.Nodes...)
	var errsMu sync.Mutex
	attemptErrs := map[string]int{}
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{
		AckLevel: level,
		OnPublishError: func(attempt int, err error) pubsub.ErrorDecision {
			errsMu.Lock()
			attemptErrs[fmt.Sprintf("%d:%v", attempt, err)]++
			errsMu.Unlock()
			return pubsub.RetryBatch(10 * time.Millisecond)
		},
	})
	require.NoError(t, err)
	// The producer streams from its own goroutine, so the fault lands with
	// batches in flight; the test goroutine injects it.
	var (
		futsMu sync.Mutex
		futs   []*pubsub.Produced
	)
	produced := func() int {
		futsMu.Lock()
		defer futsMu.Unlock()
		return len(futs)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	bg := context.Background()
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f := p.Produce(bg, []byte("p:"+strconv.Itoa(i)))
			futsMu.Lock()
			futs = append(futs, f)
			futsMu.Unlock()
			if i%10 == 0 {
				time.Sleep(time.Millisecond) // pacing the producer, not synchronisation
			}
		}
	})
	testcluster.WaitFor(t, 10*time.Second, func() bool { return rec.total() >= 600 }, "nothing delivered before the fault")
	switch fault {
	case "leave", "leave-restart":
		c.CloseNode(t, 2)
	case "crash", "crash-restart":
		c.Crash(2)
	case "server-killed":
		c.ShutdownServer(2)
	}
	if strings.HasSuffix(fault, "restart") {
		n2 := c.AddNode(t, "n2", 2, append(append([]pubsub.Option{}, fast...), pubsub.WithDeliveryMode(atLeastOnce))...)
		owners.watch(t, n2) // the restarted n2 owns the topic again
	}
	after := produced()
	testcluster.WaitFor(t, 20*time.Second, func() bool { return produced() >= after+2000 }, "producer stuck after the fault")
	close(stop)
	wg.Wait()
	n := len(futs)
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	require.NoError(t, p.Close(ctx), "producer Close")
	for i, f := range futs {
		_, _, done := f.Result()
		require.True(t, done, "future %d not done after Close", i)
	}
	// A fence reaching both live subscribers comes after every batch
	// accepted before it.
	testcluster.WaitFor(t, 15*time.Second, func() bool {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("fence"))
		return err == nil && ack.Delivered >= 2 && !failed(ack, live[0]) && !failed(ack, live[1])
	}, "fence never reached both live subscribers")

	// An owner that crashed took what it had accepted, and its events,
	// with it: at AckAccepted its loss is not the producer's to see.
	if level == pubsub.AckAccepted && !strings.HasPrefix(fault, "crash") {
		// The owners' events of deliveries failing after their answers
		// may come after the fence's ack: a deadline, not a sleep.
		testcluster.WaitFor(t, 10*time.Second, func() bool {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			for _, id := range live {
				if lacking(rec.got[id], futs) > owners.failed(id) {
					return false
				}
			}
			return true
		}, "live subscribers lack more accepted messages than their owners reported failed: %s", owners)
	}

	rec.mu.Lock()
	defer rec.mu.Unlock()
	ran := map[pubsub.SubscriberID]map[int]int{}
	for id, got := range rec.got {
		ran[id] = map[int]int{}
		inversions, dups := 0, 0
		for k, i := range got {
			ran[id][i]++
			if k > 0 && i <= got[k-1] {
				if i == got[k-1] || ran[id][i] > 1 {
					dups++
				} else {
					inversions++
				}
				if dups+inversions <= 3 {
					t.Errorf("subscriber %v ran %d after %d", id, i, got[k-1])
				}
			}
		}
		if dups+inversions > 0 {
			t.Errorf("subscriber %v: %d duplicates, %d inversions in %d runs", id, dups, inversions, len(got))
		}
	}
	outcomes := map[string]int{}
	failures := map[string]int{}
	lost, overclaim := 0, 0
	// The owner that crashed held what it had accepted: at AckAccepted its
	// loss is not the producer's to see.
	// At AckAccepted, the events were counted above.
	mustKeep := level == pubsub.AckDelivered
	for i, f := range futs {
		ack, err, _ := f.Result()
		outcomes[ack.Status.String()+"/"+ack.Reason.String()]++
		if err != nil {
			continue
		}
		handled := 0
		for _, m := range ran {
			if m[i] > 0 {
				handled++
			}
		}
		if level == pubsub.AckDelivered && ack.Delivered > handled {
			overclaim++
			if overclaim <= 3 {
				t.Errorf("message %d: ack Delivered %d, %d subscribers ran it; failures %v", i, ack.Delivered, handled, ack.Failures)
			}
		}
		for _, fl := range ack.Failures {
			failures[fl.Status.String()]++
		}
		for _, id := range live {
			if ran[id][i] == 0 && !failed(ack, id) {
				lost++
				if mustKeep && lost <= 3 {
					t.Errorf("message %d: accepted (%+v) but never ran at live subscriber %v and not listed failed", i, ack, id)
				}
			}
		}
	}
	if mustKeep && lost > 0 {
		t.Errorf("%d accepted deliveries to live subscribers missing, not listed failed", lost)
	}
	errsMu.Lock()
	t.Logf("failed attempts: %v", attemptErrs)
	errsMu.Unlock()
	for id, got := range rec.got {
		t.Logf("subscriber %v ran %d", id, len(got))
	}
	t.Logf("%s/%v: %d produced; outcomes %v; failures %v; runs %d; lost %d; overclaims %d; at the owners %s", fault, level, n, outcomes, failures, rec.n, lost, overclaim, owners)
}

// lacking counts the accepted messages of futs that got, a subscriber's
// runs, does not hold.
func lacking(got []int, futs []*pubsub.Produced) int {
	has := make(map[int]bool, len(got))
	for _, i := range got {
		has[i] = true
	}
	n := 0
	for i, f := range futs {
		if ack, err, _ := f.Result(); err == nil && ack.Status == pubsub.Accepted && !has[i] {
			n++
		}
	}
	return n
}

// deliveryFailures counts the messages nodes' DeliveryFailed events report,
// by subscriber and by status.
type deliveryFailures struct {
	mu       sync.Mutex
	messages map[pubsub.SubscriberID]int
	statuses map[string]int
}

func watchDeliveryFailures(t *testing.T, nodes ...*pubsub.Node) *deliveryFailures {
	d := &deliveryFailures{messages: map[pubsub.SubscriberID]int{}, statuses: map[string]int{}}
	for _, n := range nodes {
		d.watch(t, n)
	}
	return d
}

func (d *deliveryFailures) watch(t *testing.T, n *pubsub.Node) {
	t.Cleanup(n.Events().Subscribe(func(e pubsub.Event) {
		if ev, ok := e.(pubsub.DeliveryFailed); ok {
			d.mu.Lock()
			d.messages[ev.Subscriber] += ev.Messages
			d.statuses[ev.Status.String()] += ev.Messages
			d.mu.Unlock()
		}
	}))
}

func (d *deliveryFailures) failed(id pubsub.SubscriberID) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.messages[id]
}

func (d *deliveryFailures) String() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return fmt.Sprintf("%v by status %v", d.messages, d.statuses)
}
