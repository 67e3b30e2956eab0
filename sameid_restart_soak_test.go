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

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// sentPublish is one plain Publish of the restart probe: when it started
// and ended, and how it was answered.
type sentPublish struct {
	topic, data string
	start, end  time.Time
	ack         pubsub.PublishAck
	err         error
}

// TestSoakSameIDRestartUnderTraffic (soak tag: about 8 s): n2 owns a topic (subscribers on every node)
// and subscribes to a topic n1 owns; it crashes or closes and a node joins
// at once under its ID on the same server, while n0 publishes to both topics
// (plain Publish calls and a BatchingProducer); the new n2 subscribes again.
// Once things settle: both topics serve every live subscription; refusals
// stop within a few heartbeats of the new subscriptions; no ack claims a
// delivery that did not happen; no subscription runs a message twice (the
// topics are at-most-once); the surviving subscribers miss nothing
// accepted, the new ones nothing accepted after their Subscribe returned;
// the old incarnation's subscriptions end and no ack lists them.
func TestSoakSameIDRestartUnderTraffic(t *testing.T) {
	for _, tc := range []struct {
		name string
		// stall, if set, stalls n2's server's route one way (out: the peers
		// stop hearing server 2; in: server 2 stops hearing them) from just
		// before the restart until the new node's Join has been underway
		// for stallFor.
		stall string
		close bool
		// hb overrides the heartbeat interval: a longer one lets the new
		// node's JOIN arrive while its peers still count the crashed one
		// alive (quiet for less than 2 heartbeat intervals).
		hb time.Duration
		// skip: a known failure, with why.
		skip string
	}{
		{name: "crash"},
		{name: "close", close: true},
		{name: "crash-route-stalled-out", stall: "out"},
		{name: "crash-route-stalled-in", stall: "in", skip: "open (INTERNALS, Known limits: an owner that has not heard a member): " +
			"at the heal the new n2 may hear n0 before n1 and serve n0's publishes without n1's subscriber for a moment " +
			"(Delivered 2, no failure listed): 2 of 65 runs; 11 of 20 before the unheard-publisher check and the epoch fix " +
			"(TestPublishFromANodeTheOwnerHasNotHeardIsRefused, TestNodeThatJoinedAloneWaitsForItsPeersSubscriptions)"},
		{name: "crash-join-within-2-heartbeats", hb: 400 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip != "" {
				t.Skip(tc.skip)
			}
			opts := append([]pubsub.Option{}, fast...)
			hb := 50 * time.Millisecond
			if tc.hb != 0 {
				hb = tc.hb
				opts = append(opts, pubsub.WithHeartbeatInterval(hb), pubsub.WithMemberTimeout(20*hb))
			}
			c := testcluster.NewFaulty(t, 3, 3, opts...)
			c.WaitConverged(t, 10*time.Second)
			n0, n1, old := c.Nodes[0], c.Nodes[1], c.Nodes[2]
			own := ownedBy(t, old, "restart-own")
			other := ownedBy(t, n1, "restart-other")
			rec := newRecorder()
			live := map[string][]pubsub.SubscriberID{}
			var oldSubs []*pubsub.Subscription
			for _, n := range []*pubsub.Node{n0, n1} {
				live[own] = append(live[own], subscribe(t, n, own, rec.handler).ID())
			}
			live[other] = append(live[other], subscribe(t, n0, other, rec.handler).ID())
			oldSubs = append(oldSubs, subscribe(t, old, own, rec.handler), subscribe(t, old, other, rec.handler))
			publishUntilAccepted(t, n0, own, []byte("warm-own"), 3, 10*time.Second)
			publishUntilAccepted(t, n0, other, []byte("warm-other"), 2, 10*time.Second)

			var (
				mu       sync.Mutex
				sent     []sentPublish
				prodErrs []time.Time
			)
			p, err := pubsub.NewBatchingProducer(n0, own, pubsub.ProducerConfig{
				Linger: 2 * time.Millisecond,
				OnPublishError: func(_ int, _ error) pubsub.ErrorDecision {
					mu.Lock()
					prodErrs = append(prodErrs, time.Now())
					mu.Unlock()
					return pubsub.FailBatchAndContinue
				},
			})
			require.NoError(t, err)
			var futs []*pubsub.Produced
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					topic := own
					if i%2 == 1 {
						topic = other
					}
					data := "p:" + strconv.Itoa(i)
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					start := time.Now()
					ack, err := n0.Publish(ctx, topic, []byte(data))
					cancel()
					mu.Lock()
					sent = append(sent, sentPublish{topic: topic, data: data, start: start, end: time.Now(), ack: ack, err: err})
					mu.Unlock()
				}
			})
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					f := p.Produce(context.Background(), []byte("b:"+strconv.Itoa(i)))
					mu.Lock()
					futs = append(futs, f)
					mu.Unlock()
					if i%10 == 0 {
						time.Sleep(time.Millisecond) // pacing the producer, not synchronisation
					}
				}
			})
			testcluster.WaitFor(t, 10*time.Second, func() bool { return rec.total() >= 300 }, "nothing delivered before the restart")

			switch tc.stall {
			case "out":
				c.StallRoute(2, 0)
				c.StallRoute(2, 1)
			case "in":
				c.StallRoute(0, 2)
				c.StallRoute(1, 2)
			}
			restarted := time.Now()
			if tc.close {
				c.CloseNode(t, 2)
			} else {
				c.Crash(2)
			}
			var healer sync.WaitGroup
			if tc.stall != "" {
				healer.Go(func() {
					<-time.After(600 * time.Millisecond) // how long the fault lasts, not synchronisation
					c.HealAll()
				})
			}
			fresh := c.AddNode(t, "n2", 2, opts...)
			joined := time.Since(restarted)
			healer.Wait()
			var freshSubs []pubsub.SubscriberID
			for _, topic := range []string{own, other} {
				s := subscribe(t, fresh, topic, rec.handler)
				freshSubs = append(freshSubs, s.ID())
				live[topic] = append(live[topic], s.ID())
			}
			subscribed := time.Now()
			t.Logf("joined %v after the restart, subscribed %v after", joined, subscribed.Sub(restarted))

			// Settled: each topic reaches exactly its live subscribers.
			for topic, ids := range live {
				testcluster.WaitFor(t, 10*time.Second, func() bool {
					ack, err := n0.Publish(ctxT(t), topic, []byte("fence"))
					return err == nil && ack.Delivered == len(ids) && len(ack.Failures) == 0
				}, "%s never reached exactly its %d live subscribers", topic, len(ids))
			}
			settled := time.Since(restarted)
			mu.Lock()
			mark := len(sent)
			mu.Unlock()
			testcluster.WaitFor(t, 10*time.Second, func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(sent) >= mark+50
			}, "publisher stuck after settling")
			close(stop)
			wg.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			require.NoError(t, p.Close(ctx))
			for _, s := range oldSubs {
				select {
				case <-s.Done():
				default:
					t.Errorf("subscription %v of the old incarnation never ended", s.ID())
				}
			}

			rec.mu.Lock()
			defer rec.mu.Unlock()
			var bad []string
			// counts[id][data]: runs of data by id.
			counts := map[pubsub.SubscriberID]map[string]int{}
			for id, got := range rec.got {
				counts[id] = map[string]int{}
				for _, d := range got {
					counts[id][d]++
					if counts[id][d] == 2 && d != "fence" {
						bad = append(bad, fmt.Sprintf("%v ran %s twice", id, d))
					}
				}
			}
			handled := func(data string) int {
				k := 0
				for _, m := range counts {
					if m[data] > 0 {
						k++
					}
				}
				return k
			}
			isFresh := func(id pubsub.SubscriberID) bool {
				for _, f := range freshSubs {
					if f == id {
						return true
					}
				}
				return false
			}
			// late: started after the new subscriptions were recorded;
			// settledBy: started after the fences went through.
			check := func(ack pubsub.PublishAck, data string, late, settledBy bool, topic string) {
				if ack.Delivered > handled(data) {
					bad = append(bad, fmt.Sprintf("%s: ack Delivered %d, ran at %d", data, ack.Delivered, handled(data)))
				}
				for _, id := range live[topic] {
					if isFresh(id) && !late {
						continue
					}
					if counts[id][data] == 0 && !failed(ack, id) {
						bad = append(bad, fmt.Sprintf("%s (%+v): not run at %v, not listed failed", data, ack, id))
					}
				}
				for _, s := range oldSubs {
					if settledBy && (failed(ack, s.ID()) || counts[s.ID()][data] > 0) {
						bad = append(bad, fmt.Sprintf("%s: the old incarnation's %v is still served", data, s.ID()))
					}
				}
			}
			var lastErr time.Time
			errs := map[string]int{}
			for _, s := range sent {
				if s.err != nil {
					errs[s.err.Error()]++
					if s.end.After(lastErr) {
						lastErr = s.end
					}
					continue
				}
				// A publish started after the new subscriptions were
				// recorded (and after the settle) must include them.
				check(s.ack, s.data, s.start.After(subscribed), s.start.After(restarted.Add(settled)), s.topic)
			}
			for _, at := range prodErrs {
				if at.After(lastErr) {
					lastErr = at
				}
			}
			outcomes := map[string]int{}
			for i, f := range futs {
				ack, err, done := f.Result()
				require.True(t, done, "future %d", i)
				outcomes[ack.Status.String()+"/"+ack.Reason.String()]++
				if err == nil {
					check(ack, "b:"+strconv.Itoa(i), false, false, own)
				}
			}
			lastRefusal := "none"
			if !lastErr.IsZero() {
				lastRefusal = lastErr.Sub(restarted).String() + " after it"
			}
			t.Logf("%d publishes, errors %v; %d produced, outcomes %v; settled %v after the restart; last refusal %s",
				len(sent), errs, len(futs), outcomes, settled, lastRefusal)
			if !lastErr.IsZero() && lastErr.After(subscribed.Add(10*hb)) {
				bad = append(bad, fmt.Sprintf("refusals went on %v after the new subscriptions were recorded", lastErr.Sub(subscribed)))
			}
			if len(bad) > 8 {
				bad = append(bad[:8], fmt.Sprintf("... %d in all", len(bad)))
			}
			assert.Empty(t, bad, strings.Join(bad, "\n"))
		})
	}
}
