package pubsub_test

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// TestAtLeastOnceSubscriberRestartedWithDeliveriesPending: a subscriber's
// node, whose at-least-once deliveries the owner is retrying (its inbound
// link stalled), crashes or closes and comes back under its ID with a new
// subscription while a producer streams. No ack claims a run that did not
// happen; the live subscriber elsewhere misses nothing accepted; the new
// subscription gets every message produced after its Subscribe returned,
// in order, each once.
func TestAtLeastOnceSubscriberRestartedWithDeliveriesPending(t *testing.T) {
	for _, how := range []string{"crash", "close"} {
		t.Run(how, func(t *testing.T) {
			opts := append(append([]pubsub.Option{}, fast...), pubsub.WithDeliveryMode(atLeastOnce))
			c := testcluster.NewFaulty(t, 3, 3, opts...)
			c.WaitConverged(t, 10*time.Second)
			topic := ownedBy(t, c.Nodes[2], "alo-subrestart")
			rec := &aloRec{got: map[pubsub.SubscriberID][]int{}}
			keep := subscribe(t, c.Nodes[0], topic, rec.handler).ID()
			old := subscribe(t, c.Nodes[1], topic, rec.handler).ID()
			var errsMu sync.Mutex
			attemptErrs := map[string]int{}
			p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{
				OnPublishError: func(attempt int, err error) pubsub.ErrorDecision {
					errsMu.Lock()
					attemptErrs[err.Error()]++
					errsMu.Unlock()
					return pubsub.RetryBatch(10 * time.Millisecond)
				},
			})
			require.NoError(t, err)
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
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					f := p.Produce(context.Background(), []byte("p:"+strconv.Itoa(i)))
					futsMu.Lock()
					futs = append(futs, f)
					futsMu.Unlock()
					if i%10 == 0 {
						time.Sleep(time.Millisecond) // pacing the producer, not synchronisation
					}
				}
			})
			testcluster.WaitFor(t, 10*time.Second, func() bool { return rec.total() >= 400 }, "nothing delivered before the fault")
			c.Client(1).Stall(faultnet.Backward) // n1 hears nothing: the owner retries its deliveries
			mark := produced()
			testcluster.WaitFor(t, 10*time.Second, func() bool { return produced() >= mark+300 }, "producer stuck")
			switch how {
			case "crash":
				c.Crash(1)
			case "close":
				c.Client(1).Heal()
				c.CloseNode(t, 1)
			}
			c.Client(1).Heal()
			n1 := c.AddNode(t, "n1", 1, opts...)
			fresh := subscribe(t, n1, topic, rec.handler).ID()
			from := produced() // produced after the new subscription was recorded
			testcluster.WaitFor(t, 20*time.Second, func() bool { return produced() >= from+2000 }, "producer stuck after the restart")
			close(stop)
			wg.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			require.NoError(t, p.Close(ctx))
			testcluster.WaitFor(t, 15*time.Second, func() bool {
				ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("fence"))
				return err == nil && ack.Delivered >= 2 && !failed(ack, keep) && !failed(ack, fresh)
			}, "fence never reached both live subscribers")

			rec.mu.Lock()
			defer rec.mu.Unlock()
			ran := map[pubsub.SubscriberID]map[int]int{}
			for id, got := range rec.got {
				ran[id] = map[int]int{}
				for k, i := range got {
					ran[id][i]++
					if k > 0 && i <= got[k-1] {
						t.Errorf("subscriber %v ran %d after %d", id, i, got[k-1])
						break
					}
				}
				t.Logf("subscriber %v ran %d", id, len(got))
			}
			outcomes, failures := map[string]int{}, map[string]int{}
			bad := 0
			for i, f := range futs {
				ack, err, done := f.Result()
				require.True(t, done, "future %d", i)
				outcomes[ack.Status.String()+"/"+ack.Reason.String()]++
				if err != nil {
					continue
				}
				for _, fl := range ack.Failures {
					failures[fl.Subscriber.Node+"/"+fl.Status.String()]++
				}
				handled := 0
				for _, m := range ran {
					if m[i] > 0 {
						handled++
					}
				}
				check := func(ok bool, format string, args ...any) {
					if !ok {
						bad++
						if bad <= 5 {
							t.Errorf("message %d (ack %+v): "+format, append([]any{i, ack}, args...)...)
						}
					}
				}
				check(ack.Delivered <= handled, "Delivered %d, ran at %d", ack.Delivered, handled)
				check(ran[keep][i] > 0 || failed(ack, keep), "not run at %v, not listed failed", keep)
				if i >= from {
					check(ran[fresh][i] > 0 || failed(ack, fresh), "not run at the new %v, not listed failed", fresh)
				}
			}
			errsMu.Lock()
			t.Logf("%s: %d produced, new subscription from %d; outcomes %v; failures %v; failed attempts %v; old %v ran %d", how, len(futs), from, outcomes, failures, attemptErrs, old, len(rec.got[old]))
			errsMu.Unlock()
		})
	}
}

// aloRec records, per subscriber, every message of a producer it ran, in
// the order it ran them.
type aloRec struct {
	mu  sync.Mutex
	got map[pubsub.SubscriberID][]int
	n   int
}

func (r *aloRec) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	s, ok := strings.CutPrefix(string(m.Data), "p:")
	if !ok {
		return nil // a fence
	}
	i, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	if id.Node == "n1" && i%50 == 0 {
		time.Sleep(3 * time.Millisecond) // keeps batches in flight at the owner
	}
	r.mu.Lock()
	r.got[id] = append(r.got[id], i)
	r.n++
	r.mu.Unlock()
	return nil
}

func (r *aloRec) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// failed reports whether ack lists id among its failures.
func failed(ack pubsub.PublishAck, id pubsub.SubscriberID) bool {
	for _, f := range ack.Failures {
		if f.Subscriber == id {
			return true
		}
	}
	return false
}
