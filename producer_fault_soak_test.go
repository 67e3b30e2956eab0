//go:build soak

package pubsub_test

// Probe: a BatchingProducer with a deep queue and per-message contexts
// through faults. Checks every future completes, no AckDelivered ack counts
// more subscribers than ran the message, each subscriber sees produce order
// without duplicates, a message whose ctx ended while queued is never
// delivered and says so, keys/headers stay with their message.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

type probeRec struct {
	mu      sync.Mutex
	order   map[pubsub.SubscriberID][]int
	who     map[int]map[pubsub.SubscriberID]int // message -> subscriber -> times handled
	total   atomic.Int64
	metaBad []string
}

func newProbeRec() *probeRec {
	return &probeRec{order: map[pubsub.SubscriberID][]int{}, who: map[int]map[pubsub.SubscriberID]int{}}
}

func (r *probeRec) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	if string(m.Data) == "fence" {
		return nil
	}
	i, err := strconv.Atoi(strings.TrimPrefix(string(m.Data), "m"))
	if err != nil {
		panic(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if i%5 == 0 {
		if m.Key != "k"+strconv.Itoa(i) || m.Header.Get("Idx") != strconv.Itoa(i) {
			r.metaBad = append(r.metaBad, fmt.Sprintf("msg %d key %q header %v", i, m.Key, m.Header))
		}
	} else if m.Key != "" || len(m.Header) != 0 {
		r.metaBad = append(r.metaBad, fmt.Sprintf("msg %d has key %q header %v, produced without", i, m.Key, m.Header))
	}
	r.order[id] = append(r.order[id], i)
	if r.who[i] == nil {
		r.who[i] = map[pubsub.SubscriberID]int{}
	}
	r.who[i][id]++
	r.total.Add(1)
	return nil
}

type probeMsg struct {
	fut         *pubsub.Produced
	cancel      context.CancelFunc
	own         bool // own context
	ctx         context.Context
	cancelledAt atomic.Bool // the test cancelled it (while queued?)
	deadline    bool
}

type probeRun struct {
	c              *testcluster.Cluster
	prodNode       int
	topic          string
	level          pubsub.AckLevel
	n              int
	cfg            pubsub.ProducerConfig
	start          func(t *testing.T) // starts the fault
	heal           func(t *testing.T) // waits for its effect and heals it
	rec            *probeRec
	attemptsFailed atomic.Int64
	p              *pubsub.BatchingProducer
}

func runProbe(t *testing.T, pr *probeRun) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	pr.rec = newProbeRec()
	c := pr.c
	for _, k := range c.Live() {
		subscribe(t, c.Nodes[k], pr.topic, pr.rec.handler)
	}
	cfg := pr.cfg
	cfg.AckLevel = pr.level
	if cfg.MaxQueueSize == 0 {
		cfg.MaxQueueSize = 1 << 20
	}
	if cfg.OnPublishError == nil {
		cfg.OnPublishError = func(attempt int, err error) pubsub.ErrorDecision {
			pr.attemptsFailed.Add(1)
			return pubsub.RetryBatch(20 * time.Millisecond)
		}
	}
	p, err := pubsub.NewBatchingProducer(c.Nodes[pr.prodNode], pr.topic, cfg)
	if err != nil {
		t.Fatal(err)
	}
	pr.p = p
	msgs := make([]*probeMsg, pr.n)
	bg := context.Background()
	faultDone := make(chan struct{})
	var cancelWG sync.WaitGroup
	stopCancel := make(chan struct{})
	// a goroutine cancelling random queued own-context messages during the run
	var ownMu sync.Mutex
	var own []*probeMsg
	cancelWG.Go(func() {
		r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
		for {
			select {
			case <-stopCancel:
				return
			case <-time.After(time.Millisecond):
			}
			ownMu.Lock()
			if len(own) > 0 {
				m := own[r.IntN(len(own))]
				if _, _, done := m.fut.Result(); !done && !m.deadline {
					m.cancelledAt.Store(true)
					m.cancel()
				}
			}
			ownMu.Unlock()
		}
	})
	first := pr.n / 10
	for i := range pr.n {
		if i == first {
			if !pr.waitDelivered(int64(first)) {
				t.Fatal("nothing delivered before the fault")
			}
			t.Logf("%s fault starts at message %d", time.Now().Format("15:04:05.000"), i)
			pr.start(t)
			go func() {
				defer close(faultDone)
				pr.heal(t)
			}()
		}
		m := &probeMsg{}
		ctx := bg
		switch {
		case i%7 == 3:
			m.own, m.deadline = true, true
			ctx, m.cancel = context.WithTimeout(bg, time.Duration(rng.IntN(3000))*time.Millisecond)
		case i%11 == 4:
			m.own = true
			ctx, m.cancel = context.WithCancel(bg)
		}
		data := []byte("m" + strconv.Itoa(i))
		if i%5 == 0 {
			m.fut = p.ProduceMessage(ctx, pubsub.Outgoing{Data: data, Key: "k" + strconv.Itoa(i), Header: pubsub.Header{"Idx": {strconv.Itoa(i)}}})
		} else {
			m.fut = p.Produce(ctx, data)
		}
		m.ctx = ctx
		msgs[i] = m
		if m.own && !m.deadline {
			ownMu.Lock()
			own = append(own, m)
			ownMu.Unlock()
		}
	}
	<-faultDone
	// every future must complete after the heal
	deadline := time.Now().Add(60 * time.Second)
	for i, m := range msgs {
		select {
		case <-m.fut.Done():
		case <-time.After(time.Until(deadline)):
			t.Fatalf("future %d still pending 60s after the heal (ack level %v)", i, pr.level)
		}
	}
	close(stopCancel)
	cancelWG.Wait()
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	// fence: an AckDelivered publish reaching every live subscriber comes
	// after every batch the owner accepted before it (AckAccepted/AckNone
	// futures completed before their deliveries).
	live := len(pr.c.Live())
	if !waitCond(30*time.Second, func() bool {
		ack, err := pr.c.Nodes[pr.prodNode].Publish(ctxT(t), pr.topic, []byte("fence"))
		return err == nil && ack.Delivered == live && len(ack.Failures) == 0
	}) {
		t.Errorf("fence never reached all %d live subscribers", live)
	}
	checkProbe(t, pr, msgs)
}

func checkProbe(t *testing.T, pr *probeRun, msgs []*probeMsg) {
	r := pr.rec
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.metaBad[:min(len(r.metaBad), 10)] {
		t.Errorf("meta: %s", s)
	}
	for id, got := range r.order {
		for k := 1; k < len(got); k++ {
			if got[k] <= got[k-1] {
				t.Errorf("subscriber %v: message %d after %d (index %d of %d)", id, got[k], got[k-1], k, len(got))
				break
			}
		}
	}
	statuses := map[string]int{}
	overCount, cancelledDelivered, liveCancelled, undelivered := 0, 0, 0, 0
	for i, m := range msgs {
		ack, err, done := m.fut.Result()
		if !done {
			t.Fatalf("future %d not done", i)
		}
		key := ack.Status.String() + "/" + ack.Reason.String()
		statuses[key]++
		handled := len(r.who[i])
		switch {
		case err == nil && ack.Status == pubsub.Accepted:
			if pr.level == pubsub.AckDelivered && ack.Delivered > handled {
				overCount++
				if overCount <= 5 {
					t.Errorf("message %d: ack Delivered %d but %d subscribers ran it (%v); failures %v", i, ack.Delivered, handled, r.who[i], ack.Failures)
				}
			}
			if pr.level == pubsub.AckDelivered && ack.Delivered == 0 && handled == 0 && len(ack.Failures) == 0 {
				undelivered++
			}
		case ack.Reason == pubsub.ReasonCancelled:
			if !m.own {
				liveCancelled++
				if liveCancelled <= 5 {
					t.Errorf("message %d with a live background ctx completed Cancelled: %v", i, err)
				}
			}
			if handled > 0 {
				cancelledDelivered++
				if cancelledDelivered <= 5 {
					t.Logf("message %d completed Cancelled (%v) yet ran at %v (deadline %v)", i, err, r.who[i], m.deadline)
				}
			}
		}
		if ack.Reason == pubsub.ReasonCancelled {
			if m.ctx.Err() == nil {
				t.Errorf("message %d: Cancelled but its ctx is live: %v", i, err)
			} else if errors.Is(m.ctx.Err(), context.Canceled) && !m.cancelledAt.Load() {
				t.Errorf("message %d: Canceled but never cancelled by the test", i)
			}
		}
	}
	if cancelledDelivered > 0 {
		t.Errorf("%d messages completed Cancelled although delivered (failed attempts in run: %d)", cancelledDelivered, pr.attemptsFailed.Load())
	}
	if overCount > 0 {
		t.Errorf("%d acks over-count deliveries", overCount)
	}
	t.Logf("level %v: outcomes %v; handled %d; failed attempts %d; accepted-with-nothing %d", pr.level, statuses, r.total.Load(), pr.attemptsFailed.Load(), undelivered)
}

// waitDelivered waits until n deliveries were recorded.
func (pr *probeRun) waitDelivered(n int64) bool {
	return waitCond(60*time.Second, func() bool { return pr.rec.total.Load() >= n })
}

// waitCond polls cond every 2 ms until it holds (true) or d passed (false).
func waitCond(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond) // polling a condition, with a deadline
	}
	return true
}

func probeLevels() []pubsub.AckLevel {
	return []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone}
}

// owner (n1) crashes mid-burst, producer on n0, deep queue.
func TestSoakProducerOwnerCrash(t *testing.T) {
	for _, lvl := range probeLevels() {
		t.Run(lvl.String(), func(t *testing.T) {
			c := newFaultyCluster(t)
			pr := &probeRun{c: c, prodNode: 0, topic: ownedBy(t, c.Nodes[1], "probe-crash"), level: lvl, n: probeN,
				cfg: pubsub.ProducerConfig{BatchSize: 300}}
			pr.start = func(t *testing.T) { c.Crash(1) }
			pr.heal = func(t *testing.T) {
				if !waitCond(20*time.Second, func() bool { return len(c.Nodes[0].Members()) == 2 }) {
					t.Error("n1 not dropped")
				}
			}
			runProbe(t, pr)
		})
	}
}

// the producer's node connection stalled both ways, then healed.
func TestSoakProducerClientStall(t *testing.T) {
	for _, lvl := range probeLevels() {
		t.Run(lvl.String(), func(t *testing.T) {
			c := newFaultyCluster(t)
			pr := &probeRun{c: c, prodNode: 0, topic: ownedBy(t, c.Nodes[1], "probe-cstall"), level: lvl, n: probeN,
				cfg: pubsub.ProducerConfig{BatchSize: 300}}
			pr.start = func(t *testing.T) { c.Client(0).Stall(faultnet.Both) }
			pr.heal = func(t *testing.T) {
				if !waitCond(20*time.Second, func() bool { return len(c.Nodes[1].Members()) == 2 }) {
					t.Error("n0 not dropped")
				}
				c.HealAll()
				if !waitCond(20*time.Second, func() bool { return len(c.Nodes[1].Members()) == 3 && len(c.Nodes[0].Members()) == 3 }) {
					t.Error("no reconvergence")
				}
			}
			runProbe(t, pr)
		})
	}
}

// route stalled one way between the producer's server (0) and the owner's (1).
func TestSoakProducerRouteStall(t *testing.T) {
	for _, dir := range [][2]int{{0, 1}, {1, 0}} {
		for _, lvl := range probeLevels() {
			t.Run(fmt.Sprintf("%d-%d/%v", dir[0], dir[1], lvl), func(t *testing.T) {
				c := newFaultyCluster(t)
				pr := &probeRun{c: c, prodNode: 0, topic: ownedBy(t, c.Nodes[1], "probe-rstall"), level: lvl, n: probeN,
					cfg: pubsub.ProducerConfig{BatchSize: 300}}
				pr.start = func(t *testing.T) { c.StallRoute(dir[0], dir[1]) }
				pr.heal = func(t *testing.T) {
					to := c.Nodes[dir[1]]
					if !waitCond(20*time.Second, func() bool { return len(to.Members()) == 2 }) {
						t.Error("nobody dropped")
					}
					c.HealAll()
					if !waitCond(20*time.Second, func() bool {
						return c.Meshed() && len(c.Nodes[0].Members()) == 3 && len(c.Nodes[1].Members()) == 3 && len(c.Nodes[2].Members()) == 3
					}) {
						t.Error("no reconvergence")
					}
				}
				runProbe(t, pr)
			})
		}
	}
}

// the owner's server killed (plain cluster: nodes fail over).
func TestSoakProducerOwnerServerKilled(t *testing.T) {
	for _, lvl := range probeLevels() {
		t.Run(lvl.String(), func(t *testing.T) {
			c := newCluster(t, 3, 3)
			pr := &probeRun{c: c, prodNode: 0, topic: ownedBy(t, c.Nodes[1], "probe-skill"), level: lvl, n: probeN,
				cfg: pubsub.ProducerConfig{BatchSize: 300}}
			pr.start = func(t *testing.T) { go c.ShutdownServer(1) }
			pr.heal = func(t *testing.T) {
				if !waitCond(20*time.Second, func() bool { return c.Conns[1].IsConnected() && c.Conns[1].ConnectedServerId() != "" }) {
					t.Error("n1 never reconnected")
				}
			}
			runProbe(t, pr)
		})
	}
}

const probeN = 100000
