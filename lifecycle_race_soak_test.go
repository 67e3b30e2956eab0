//go:build soak

package pubsub_test

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Producer and node Close racing Produce from many goroutines, at every
// ack level, local and remote owner, with Close contexts from 0 to 10 s
// (36 cases, about 40 s under -race): every future completes, and none
// claims a delivery its handler did not run. Behind the soak tag for
// their length; TestProducerCloseGivingUpNeverCallsARunBatchUnpublished
// pins the race they found in the regular suite.

type lpOutcome struct {
	ack pubsub.PublishAck
	err error
}

// lpProduceRace produces from many goroutines into p while closeFn runs,
// then checks that every future completes and that none reports a message
// delivered that its handler did not run, nor "not published" one that it
// ran. seen reports the handler's runs per message.
func lpProduceRace(t *testing.T, tag string, p *pubsub.BatchingProducer, closeFn func(), seen func() map[string]int, quiet func()) {
	t.Helper()
	const producers, each = 8, 400
	var futs [producers][each]*pubsub.Produced
	started := make(chan struct{}, producers)
	doneProducing := make(chan struct{})
	go func() {
		defer close(doneProducing)
		var wg sync.WaitGroup
		for g := range producers {
			wg.Go(func() {
				for i := range each {
					ctx := context.Background()
					if i%7 == 3 {
						c, cancel := context.WithCancel(context.Background())
						if i%14 == 3 {
							cancel()
						} else {
							defer cancel()
						}
						ctx = c
					}
					futs[g][i] = p.Produce(ctx, []byte(fmt.Sprintf("%s/g%d-%d", tag, g, i)))
					if i == 50 {
						started <- struct{}{}
					}
				}
			})
		}
		wg.Wait()
	}()
	for range producers {
		<-started
	}
	closeFn()
	<-doneProducing
	out := map[string]lpOutcome{}
	lpWithin(t, 30*time.Second, "every future completing", func() {
		for g := range producers {
			for i := range each {
				ack, err := futs[g][i].Wait(context.Background())
				out[fmt.Sprintf("%s/g%d-%d", tag, g, i)] = lpOutcome{ack, err}
			}
		}
	})
	quiet()
	runs := seen()
	counts := map[string]int{}
	for m, o := range out {
		key := o.ack.Status.String() + "/" + o.ack.Reason.String()
		counts[key]++
		if o.err != nil {
			assert.ErrorIs(t, o.err, o.ack.Reason.Err(), "%s", m)
		}
		switch {
		case o.err == nil && o.ack.Level == pubsub.AckDelivered && o.ack.Delivered == 1 && runs[m] == 0:
			t.Errorf("%s: ack says delivered (%+v) but the handler never ran it", m, o.ack)
		case o.err != nil && (o.ack.Reason == pubsub.ReasonClosed || o.ack.Reason == pubsub.ReasonCancelled || o.ack.Reason == pubsub.ReasonQueueFull) && runs[m] > 0:
			t.Errorf("%s: rejected %s (%v) but the handler ran it %d times", m, o.ack.Reason, o.err, runs[m])
		}
		if runs[m] > 1 {
			t.Errorf("%s: handler ran it %d times", m, runs[m])
		}
	}
	t.Logf("outcomes: %v", counts)
}

type lpSeen struct {
	mu   sync.Mutex
	runs map[string]int
	busy atomic.Int32
}

func (s *lpSeen) handler(slow time.Duration) pubsub.Handler {
	return func(ctx context.Context, m *pubsub.Message) error {
		s.busy.Add(1)
		defer s.busy.Add(-1)
		s.mu.Lock()
		s.runs[string(m.Data)]++
		s.mu.Unlock()
		if slow > 0 {
			select {
			case <-time.After(slow):
			case <-ctx.Done():
			}
		}
		return nil
	}
}

func (s *lpSeen) snapshot() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.runs)
}

// Probe: BatchingProducer.Close with a short ctx while many goroutines
// produce, at every ack level, owner local and remote.
func TestSoakProducerCloseRacesProduce(t *testing.T) {
	c := newCluster(t, 2, 3)
	n0 := c.Nodes[0]
	for _, owner := range []int{0, 1} {
		topic := ownedBy(t, c.Nodes[owner], fmt.Sprintf("pc%d", owner))
		seen := &lpSeen{runs: map[string]int{}}
		sub, err := c.Nodes[2].Subscribe(ctxT(t), topic, seen.handler(200*time.Microsecond))
		require.NoError(t, err)
		for _, l := range lpLevels {
			for _, d := range []time.Duration{0, 5 * time.Millisecond, 50 * time.Millisecond} {
				t.Run(fmt.Sprintf("owner%d/%s/%v", owner, l, d), func(t *testing.T) {
					p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 64, MaxInFlight: 3,
						OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(time.Millisecond) }})
					require.NoError(t, err)
					lpProduceRace(t, t.Name(), p, func() {
						ctx, cancel := context.WithTimeout(context.Background(), d)
						defer cancel()
						err := p.Close(ctx)
						t.Logf("Close: %v", err)
					}, seen.snapshot, func() {
						testcluster.WaitFor(t, 10*time.Second, func() bool { return seen.busy.Load() == 0 }, "handler still busy")
						// AckNone/AckAccepted: deliveries may still be in flight at the subscriber node.
						last, at := -1, time.Now()
						testcluster.WaitFor(t, 10*time.Second, func() bool {
							n := 0
							for _, k := range seen.snapshot() {
								n += k
							}
							if n != last {
								last, at = n, time.Now()
							}
							return seen.busy.Load() == 0 && time.Since(at) > 300*time.Millisecond
						}, "handler still receiving")
					})
				})
			}
		}
		require.NoError(t, sub.Unsubscribe(ctxT(t)))
	}
}

// Probe: the producer's node closes (with a short or expired ctx) while
// many goroutines produce into it, at every ack level, the owner being the
// closing node or another one.
func TestSoakNodeCloseRacesProduce(t *testing.T) {
	for _, owner := range []int{0, 1} {
		for _, l := range lpLevels {
			for _, d := range []time.Duration{0, 20 * time.Millisecond, 10 * time.Second} {
				t.Run(fmt.Sprintf("owner%d/%s/%v", owner, l, d), func(t *testing.T) {
					c := newCluster(t, 2, 3)
					n0 := c.Nodes[0]
					topic := ownedBy(t, c.Nodes[owner], "nc")
					seen := &lpSeen{runs: map[string]int{}}
					_, err := c.Nodes[2].Subscribe(ctxT(t), topic, seen.handler(100*time.Microsecond))
					require.NoError(t, err)
					p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 64, MaxInFlight: 3})
					require.NoError(t, err)
					lpProduceRace(t, t.Name(), p, func() {
						ctx, cancel := context.WithTimeout(context.Background(), d)
						defer cancel()
						err := n0.Close(ctx)
						t.Logf("node Close: %v", err)
					}, seen.snapshot, func() {
						last, at := -1, time.Now()
						testcluster.WaitFor(t, 10*time.Second, func() bool {
							n := 0
							for _, k := range seen.snapshot() {
								n += k
							}
							if n != last {
								last, at = n, time.Now()
							}
							return seen.busy.Load() == 0 && time.Since(at) > 300*time.Millisecond
						}, "handler still receiving")
					})
					lpWithin(t, 15*time.Second, "producer Close", func() { assert.NoError(t, p.Close(ctxT(t))) })
				})
			}
		}
	}
}
