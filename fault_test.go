package pubsub_test

// Network faults on a 3-server cluster whose every route and node connection
// runs through a fault-injecting proxy (testcluster.NewFaulty). Each fault
// lasts 5 s with MemberTimeout 2 s while every node publishes sequentially.
// After the heal, within 2 x MemberTimeout, every topic must serve and every
// live subscription receive; throughout, no ack may claim more deliveries
// than happened and each publisher's order must hold at every subscriber.

import (
	"context"
	"fmt"
	"strconv"
	"strings"
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

const (
	faultMemberTimeout = 2 * time.Second // as in fast
	faultDuration      = 5 * time.Second
)

// faultLoad is the workload a fault test runs: topics owned by every node,
// a subscriber of each on every node, and one sequential publisher per node.
type faultLoad struct {
	c      *testcluster.Cluster
	topics []string
	subs   map[string][]*pubsub.Subscription // by topic

	mu       sync.Mutex
	received map[pubsub.SubscriberID][]string // message bodies, in order
	copies   map[string]int                   // message body -> subscribers that got it
	acks     map[string]pubsub.PublishAck     // message body -> its accepted ack
	rejected map[pubsub.Reason]int
	levels   []pubsub.AckLevel // publishers cycle through them; empty: AckDelivered

	stop chan struct{}
	wg   sync.WaitGroup
}

func newFaultLoad(t *testing.T, c *testcluster.Cluster) *faultLoad {
	l := &faultLoad{c: c, subs: map[string][]*pubsub.Subscription{}, received: map[pubsub.SubscriberID][]string{},
		copies: map[string]int{}, acks: map[string]pubsub.PublishAck{}, rejected: map[pubsub.Reason]int{}, stop: make(chan struct{})}
	for k, owner := range c.Nodes {
		for j := range 2 {
			topic := ownedBy(t, owner, fmt.Sprintf("fault-%d-%d", k, j))
			l.topics = append(l.topics, topic)
			for _, n := range c.Nodes {
				l.subs[topic] = append(l.subs[topic], subscribe(t, n, topic, l.handle))
			}
		}
	}
	return l
}

func (l *faultLoad) handle(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	l.mu.Lock()
	l.received[id] = append(l.received[id], string(m.Data))
	l.copies[string(m.Data)]++
	l.mu.Unlock()
	return nil
}

// start runs one sequential publisher per node until stopPublishers.
func (l *faultLoad) start() {
	for k, n := range l.c.Nodes {
		l.wg.Go(func() {
			for seq := 1; ; seq++ {
				select {
				case <-l.stop:
					return
				default:
				}
				topic := l.topics[seq%len(l.topics)]
				body := fmt.Sprintf("%s|p%d|%d", topic, k, seq)
				level := pubsub.AckDelivered
				if len(l.levels) > 0 {
					level = l.levels[seq%len(l.levels)]
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				ack, err := n.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte(body)}}, pubsub.WithAck(level))
				cancel()
				l.mu.Lock()
				if err == nil {
					l.acks[body] = ack
				} else {
					l.rejected[ack.Reason]++
				}
				l.mu.Unlock()
				if err != nil {
					time.Sleep(5 * time.Millisecond) // pacing a failing loop, not synchronisation
				}
			}
		})
	}
}

func (l *faultLoad) stopPublishers() {
	close(l.stop)
	l.wg.Wait()
}

// waitServing publishes a marker to every topic until each reaches every
// live subscription, and returns how long that took.
func (l *faultLoad) waitServing(t *testing.T, within time.Duration, tag string) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for i, topic := range l.topics {
		var live []*pubsub.Subscription
		for _, s := range l.subs[topic] {
			select {
			case <-s.Done():
				require.Error(t, s.Err(), "%s ended without saying why", s.ID())
			default:
				live = append(live, s)
			}
		}
		marker := fmt.Sprintf("%s|marker|%s-%d", topic, tag, i)
		for {
			ack, err := l.c.Nodes[i%len(l.c.Nodes)].Publish(ctxT(t), topic, []byte(marker))
			if err == nil && ack.Delivered == len(live) && len(ack.Failures) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not serve all %d live subscribers %v after the heal: ack %+v err %v", topic, len(live), within, ack, err)
			}
		}
		for _, s := range live {
			got := l.of(s.ID())
			require.Contains(t, got, marker, "live subscription %s missed the marker", s.ID())
		}
	}
	return time.Since(start)
}

func (l *faultLoad) of(id pubsub.SubscriberID) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.received[id]...)
}

// checkHonest checks every accepted ack against what subscribers received,
// and each publisher's order at each subscriber.
func (l *faultLoad) checkHonest(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	overclaims := 0
	for body, ack := range l.acks {
		if l.copies[body] < ack.Delivered {
			overclaims++
			if overclaims <= 3 {
				t.Errorf("ack of %s claims %d deliveries, %d happened", body, ack.Delivered, l.copies[body])
			}
		}
	}
	assert.Zero(t, overclaims, "acks claiming deliveries that did not happen")
	for id, bodies := range l.received {
		last := map[string]int{} // topic|publisher -> last seq
		for _, b := range bodies {
			parts := strings.Split(b, "|")
			if parts[1] == "marker" {
				continue
			}
			seq, _ := strconv.Atoi(parts[2])
			key := parts[0] + "|" + parts[1]
			if seq <= last[key] {
				t.Errorf("%s got %s after seq %d: publisher order broken", id, b, last[key])
			}
			last[key] = seq
		}
	}
	t.Logf("%d publishes accepted, rejected by reason: %v", len(l.acks), l.rejected)
}

// runFault runs the workload around one fault and checks the invariants.
// With levels, each publisher cycles through those ack levels.
func runFault(t *testing.T, c *testcluster.Cluster, inject func(), levels ...pubsub.AckLevel) *faultLoad {
	l := newFaultLoad(t, c)
	l.levels = levels
	l.start()
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.acks) >= 30
	}, "publishers make no progress before the fault")
	inject()
	time.Sleep(faultDuration) // the fault's duration is the point here
	c.HealAll()
	healed := l.waitServing(t, 2*faultMemberTimeout+2*time.Second, "healed")
	t.Logf("every topic served every live subscription %v after the heal (MemberTimeout %v)", healed, faultMemberTimeout)
	l.stopPublishers()
	l.checkHonest(t)
	return l
}

func newFaultyCluster(t *testing.T, opts ...pubsub.Option) *testcluster.Cluster {
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...), opts...)...)
	c.WaitConverged(t, 10*time.Second)
	return c
}

func TestFaultRouteStalledOneWay(t *testing.T) {
	leakcheck.Parallel(t)
	c := newFaultyCluster(t)
	runFault(t, c, func() { c.StallRoute(1, 0) })
}

func TestFaultRouteStalledBothWays(t *testing.T) {
	leakcheck.Parallel(t)
	c := newFaultyCluster(t)
	runFault(t, c, func() { c.Route(0, 1).Stall(faultnet.Both) })
}

// Finding 5: a route cut longer than SubscriberTimeout must not evict
// subscribers whose handlers never ran late: their node did not answer,
// which is not their failure.
// The same faults with every ack level in each publisher's sequence: the
// early-ack queue, the publisher's AckNone outbox and AckDelivered
// publishes interleave, and each publisher's order must hold at every
// subscriber through the fault and the heal (an AckNone message may be
// lost in the fault, never reordered), with no ack claiming a delivery.
func TestFaultMixedAckLevels(t *testing.T) {
	leakcheck.Parallel(t)
	levels := []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckNone, pubsub.AckNone, pubsub.AckAccepted, pubsub.AckNone}
	t.Run("route stalled one way", func(t *testing.T) {
		c := newFaultyCluster(t)
		runFault(t, c, func() { c.StallRoute(1, 0) }, levels...)
	})
	t.Run("route cut", func(t *testing.T) {
		c := newFaultyCluster(t)
		runFault(t, c, func() { c.Route(0, 1).Cut() }, levels...)
	})
}

func TestFaultRouteCutEvictsNobody(t *testing.T) {
	leakcheck.Parallel(t)
	c := newFaultyCluster(t)
	l := runFault(t, c, func() { c.Route(0, 1).Cut() })
	for topic, subs := range l.subs {
		for _, s := range subs {
			select {
			case <-s.Done():
				t.Errorf("%s on %s ended by a route cut: %v", s.ID(), topic, s.Err())
			default:
			}
		}
	}
}

func TestFaultClientConnectionCut(t *testing.T) {
	leakcheck.Parallel(t)
	c := newFaultyCluster(t)
	runFault(t, c, func() { c.Client(2).Cut() })
}

// Finding 11: under KeepMajority a node cut off from the others stops
// serving as owner, while the majority keeps serving; under the default
// KeepServing both sides serve.
func TestPartitionPolicy(t *testing.T) {
	leakcheck.Parallel(t)
	for _, tc := range []struct {
		policy       pubsub.PartitionPolicy
		minorityTake bool
	}{
		{pubsub.KeepServing, true},
		{pubsub.KeepMajority, false},
	} {
		t.Run(tc.policy.String(), func(t *testing.T) {
			c := newFaultyCluster(t, pubsub.WithPartitionPolicy(tc.policy))
			minorityTopic := ownedBy(t, c.Nodes[2], "minority")
			majorityTopic := ownedBy(t, c.Nodes[0], "majority")
			rec := newRecorder()
			for _, n := range c.Nodes {
				subscribe(t, n, minorityTopic, rec.handler)
				subscribe(t, n, majorityTopic, rec.handler)
			}
			c.Client(2).Cut()
			c.WaitConverged(t, 2*faultMemberTimeout, 0, 1)
			// The majority serves both topics (it took n2's over) to its own
			// subscribers.
			publishUntilAccepted(t, c.Nodes[0], minorityTopic, []byte("maj"), 2, 2*time.Second)
			publishUntilAccepted(t, c.Nodes[1], majorityTopic, []byte("maj"), 2, 2*time.Second)
			// The minority node, alone in its view, owns every topic.
			testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool { return len(c.Nodes[2].Members()) == 1 },
				"n2 still sees %v", c.Nodes[2].Members())
			ack, err := c.Nodes[2].Publish(ctxT(t), minorityTopic, []byte("min"))
			if tc.minorityTake {
				require.NoError(t, err)
				assert.Equal(t, 1, ack.Delivered, "only n2's own subscriber is in reach")
			} else {
				require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
				assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
			}
			c.HealAll()
			c.WaitConverged(t, 2*faultMemberTimeout)
			publishUntilAccepted(t, c.Nodes[2], minorityTopic, []byte("healed"), 3, 2*faultMemberTimeout)
			publishUntilAccepted(t, c.Nodes[2], majorityTopic, []byte("healed"), 3, 2*faultMemberTimeout)
		})
	}
}

// Regression (probe): during a one-way stall of the route from a topic's
// owner to a subscriber's node, the owner keeps sending it batches, which
// pile up in the route. At the heal they arrive at once, more than the
// subscriber's mailbox holds, and the MailboxFull failures of the last
// ones evicted a healthy subscriber (EvictAfter in a row, within
// milliseconds). MailboxFull now evicts only a subscriber that stays
// behind for SubscriberTimeout. MemberTimeout is above the stall here, so
// the view never changes and the owner waits for every held batch.
func TestFaultStallBacklogEvictsNobody(t *testing.T) {
	c := testcluster.NewFaulty(t, 2, 2, append(append([]pubsub.Option{}, fast...),
		pubsub.WithMemberTimeout(10*time.Second), pubsub.WithSubscriberTimeout(10*time.Second))...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "backlog")
	var got atomic.Int64
	sub := subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error { got.Add(1); return nil })
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("before"))
	mustAccept(t, ack, err, 1)

	c.StallRoute(0, 1) // deliveries held; the node's reports and heartbeats still flow
	backlog := 3 * pubsub.DefaultMailboxSize / 2
	for i := range backlog { // one-message batches nobody waits on: all held in the stall
		_, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: msg(i)}}, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err)
	}
	c.HealAll()
	testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("after"))
		return err == nil && ack.Delivered == 1
	}, "no publish reached the subscriber after the heal")
	select {
	case <-sub.Done():
		t.Fatalf("a healthy subscriber was evicted by a stalled route's backlog of %d batches (mailbox %d): %v",
			backlog, pubsub.DefaultMailboxSize, sub.Err())
	default:
	}
	t.Logf("%d messages handled in all, %d of them held in the stall", got.Load(), backlog)
}
