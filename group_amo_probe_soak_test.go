//go:build soak

package pubsub_test

// A probe of README's "any, at-most-once topic" row for consumer groups:
// at most once per group, except when the group changed between a producer
// batch's attempts (a member's node left, the owner forgot the producer) or
// a retry went through another owner. Pipelined BatchingProducers
// (MaxInFlight 4, short PublishTimeout, RetryBatch) publish keyed and
// keyless messages, in one-message and large batches, to a group with
// members on four nodes, through phases of faults that make attempts time
// out WITHOUT changing the group (a slow broadcast subscriber on the
// owner's path, one-way route stalls and a client stall shorter than
// MemberTimeout), then faults that DO change it (a member node's crash,
// the owner's crash).
//
//	go test -race -tags soak -run TestSoakGroupAtMostOnceRetries -v .
//
// Every run of a message by a member is recorded with its time; views,
// owner and group changes are recorded from every node's events. A message
// run more than once is counted inside the stated exceptions when such a
// change happened between its first run (less a PublishTimeout's worth of
// retries) and its last, outside otherwise: outside fails the test. Also
// checked: every future completes, and an accepted ack listing no failure
// for the group means some member ran the message.

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

type amoRun struct {
	member string
	at     time.Time
	phase  string
}

type amoChange struct {
	at   time.Time
	what string
}

type amoProbe struct {
	mu      sync.Mutex
	runs    map[string][]amoRun
	changes []amoChange
	phase   string
	retries map[string]int // OnPublishError calls per phase
}

func (p *amoProbe) ran(data, member string) {
	p.mu.Lock()
	p.runs[data] = append(p.runs[data], amoRun{member: member, at: time.Now(), phase: p.phase})
	p.mu.Unlock()
}

// changed records a change at its event's time (listeners run late).
func (p *amoProbe) changed(at time.Time, what string) {
	p.mu.Lock()
	p.changes = append(p.changes, amoChange{at: at, what: what + " (phase " + p.phase + ")"})
	p.mu.Unlock()
}

func (p *amoProbe) setPhase(s string) {
	p.mu.Lock()
	p.phase = s
	p.mu.Unlock()
}

func (p *amoProbe) retried() {
	p.mu.Lock()
	p.retries[p.phase]++
	p.mu.Unlock()
}

func (p *amoProbe) totalRuns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, r := range p.runs {
		n += len(r)
	}
	return n
}

func TestSoakGroupAtMostOnceRetries(t *testing.T) {
	const publishTimeout = 400 * time.Millisecond
	c := testcluster.NewFaulty(t, 4, 4, fast...)
	c.WaitConverged(t, 15*time.Second)
	const owner = 1
	topic := ownedBy(t, c.Nodes[owner], "amo-probe")
	pr := &amoProbe{runs: map[string][]amoRun{}, retries: map[string]int{}, phase: "setup"}

	for i, n := range c.Nodes {
		i := i
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			switch e := e.(type) {
			case pubsub.MemberLeft:
				pr.changed(e.Time, fmt.Sprintf("n%d: %s left", i, e.Member.ID))
			case pubsub.MemberJoined:
				pr.changed(e.Time, fmt.Sprintf("n%d: %s joined", i, e.Member.ID))
			case pubsub.TopicOwnerChanged:
				if e.Topic == topic {
					pr.changed(e.Time, fmt.Sprintf("n%d: owner %s -> %s", i, e.OldOwner, e.NewOwner))
				}
			case pubsub.SubscriberAdded:
				if e.Topic == topic && e.Group != "" {
					pr.changed(e.Time, fmt.Sprintf("n%d: added %s", i, e.Subscriber))
				}
			case pubsub.SubscriberRemoved:
				if e.Topic == topic && e.Group != "" {
					pr.changed(e.Time, fmt.Sprintf("n%d: removed %s", i, e.Subscriber))
				}
			case pubsub.SubscriberEvicted:
				if e.Topic == topic && e.Group != "" {
					pr.changed(e.Time, fmt.Sprintf("n%d: evicted %s (%v)", i, e.Subscriber, e.Status))
				}
			}
		})
		t.Cleanup(cancel)
	}

	// Members: n0, n1 (the owner), two on n2, n3.
	for k, ni := range []int{0, 1, 2, 2, 3} {
		member := fmt.Sprintf("n%d#%d", ni, k)
		_, err := c.Nodes[ni].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
			pr.ran(string(m.Data), member)
			return nil
		}, pubsub.WithGroup("g"))
		if err != nil {
			t.Fatal(err)
		}
	}
	// Broadcast subscribers: a fast one on n0, and one on n2 that, while
	// slow is set, holds every 25th message until its deadline: the owner's
	// answers to batches behind it come after the producers' timeouts.
	var slow atomic.Bool
	var bseen atomic.Int64
	subscribe(t, c.Nodes[0], topic, func(context.Context, *pubsub.Message) error { return nil })
	subscribe(t, c.Nodes[2], topic, func(ctx context.Context, _ *pubsub.Message) error {
		if bseen.Add(1)%25 == 0 && slow.Load() {
			<-ctx.Done()
		}
		return nil
	})
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		st, err := c.Nodes[0].TopicStats(ctxT(t), topic)
		return err == nil && st.Groups["g"] == 5
	}, "the group never had its 5 members at the owner")

	// Producers: n0 one-message batches, n2 large batches (Linger), n3
	// medium ones; every third message keyless.
	type produced struct {
		data string
		fut  *pubsub.Produced
	}
	var (
		pmu  sync.Mutex
		futs []produced
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	cfgs := []struct {
		node int
		cfg  pubsub.ProducerConfig
	}{
		{0, pubsub.ProducerConfig{BatchSize: 1}},
		{2, pubsub.ProducerConfig{BatchSize: 300, Linger: 20 * time.Millisecond}},
		{3, pubsub.ProducerConfig{BatchSize: 20, Linger: 5 * time.Millisecond}},
	}
	var producers []*pubsub.BatchingProducer
	for pi, pc := range cfgs {
		cfg := pc.cfg
		cfg.MaxInFlight = 4
		cfg.PublishTimeout = publishTimeout
		cfg.OnPublishError = func(int, error) pubsub.ErrorDecision { pr.retried(); return pubsub.RetryBatch(20 * time.Millisecond) }
		p, err := pubsub.NewBatchingProducer(c.Nodes[pc.node], topic, cfg)
		if err != nil {
			t.Fatal(err)
		}
		producers = append(producers, p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				data := fmt.Sprintf("p%d-m%06d", pi, i)
				key := ""
				if i%3 != 0 {
					key = fmt.Sprintf("k%02d", i%40)
				}
				f := p.ProduceMessage(context.Background(), pubsub.Outgoing{Data: []byte(data), Key: key})
				pmu.Lock()
				futs = append(futs, produced{data, f})
				pmu.Unlock()
			}
		}()
	}
	// hold keeps a fault for d, or until the test's producers retried n
	// more times, whichever comes first (a bound, not synchronisation).
	retriesNow := func() int {
		pr.mu.Lock()
		defer pr.mu.Unlock()
		n := 0
		for _, r := range pr.retries {
			n += r
		}
		return n
	}
	runFor := func(d time.Duration) {
		start := pr.totalRuns()
		deadline := time.Now().Add(d)
		// Wait until messages flowed for d (the runs keep growing).
		testcluster.WaitFor(t, d+20*time.Second, func() bool { return time.Now().After(deadline) && pr.totalRuns() > start },
			"no message ran during %v", d)
	}
	hold := func(d time.Duration, retries int) {
		base := retriesNow()
		deadline := time.Now().Add(d)
		testcluster.WaitFor(t, d+time.Second, func() bool { return time.Now().After(deadline) || retriesNow() >= base+retries },
			"fault hold")
	}

	pr.setPhase("warmup")
	runFor(time.Second)

	pr.setPhase("slow-broadcast")
	slow.Store(true)
	runFor(5 * time.Second)
	slow.Store(false)

	stalls := []struct {
		name string
		do   func()
	}{
		{"stall-route-1to2", func() { c.StallRoute(1, 2) }},
		{"stall-route-2to1", func() { c.StallRoute(2, 1) }},
		{"stall-route-1to3", func() { c.StallRoute(1, 3) }},
		{"stall-route-1to0", func() { c.StallRoute(1, 0) }},
		{"stall-client-n2-in", func() { c.Client(2).Stall(faultnet.Backward) }},
		{"stall-client-n1-out", func() { c.Client(1).Stall(faultnet.Forward) }},
	}
	for round := range 2 {
		for _, s := range stalls {
			pr.setPhase(fmt.Sprintf("%s/%d", s.name, round))
			s.do()
			hold(900*time.Millisecond, 40) // well under MemberTimeout (2 s)
			c.HealAll()
			c.WaitMeshed(t, 15*time.Second)
			runFor(600 * time.Millisecond)
		}
	}
	pr.setPhase("quiet-before-changes")
	c.WaitConverged(t, 15*time.Second)
	runFor(time.Second)

	pr.setPhase("crash-member-node-n3")
	slow.Store(true) // attempts in flight time out while n3 leaves
	c.Crash(3)
	c.WaitConverged(t, 15*time.Second)
	runFor(2 * time.Second)
	slow.Store(false)

	pr.setPhase("crash-owner-n1")
	slow.Store(true)
	c.Crash(owner)
	c.WaitConverged(t, 15*time.Second)
	runFor(3 * time.Second)
	slow.Store(false)

	pr.setPhase("drain")
	close(stop)
	wg.Wait()
	for _, p := range producers {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := p.Close(ctx); err != nil {
			t.Logf("producer close: %v", err)
		}
		cancel()
	}

	// Every future completes.
	pmu.Lock()
	all := append([]produced(nil), futs...)
	pmu.Unlock()
	type outcome struct {
		ack pubsub.PublishAck
		err error
	}
	outcomes := make([]outcome, len(all))
	incomplete := 0
	for i, f := range all {
		select {
		case <-f.fut.Done():
		case <-time.After(30 * time.Second):
			incomplete++
			continue
		}
		ack, err, _ := f.fut.Result()
		outcomes[i] = outcome{ack, err}
	}
	if incomplete > 0 {
		t.Errorf("%d of %d futures never completed", incomplete, len(all))
	}
	// Let deliveries in flight finish: the runs stop growing.
	last, lastAt := pr.totalRuns(), time.Now()
	testcluster.WaitFor(t, 30*time.Second, func() bool {
		if n := pr.totalRuns(); n != last {
			last, lastAt = n, time.Now()
		}
		return time.Since(lastAt) > 3*time.Second
	}, "deliveries never settled")

	pr.mu.Lock()
	defer pr.mu.Unlock()
	changeBetween := func(from, to time.Time) []string {
		var out []string
		for _, ch := range pr.changes {
			if !ch.at.Before(from) && !ch.at.After(to) {
				out = append(out, ch.what)
			}
		}
		return out
	}
	var inside, outside []string
	insideN, outsideN := map[string]int{}, map[string]int{}
	claimed, rejected, groupFailed := 0, 0, 0
	var unclaimed []string
	for i, f := range all {
		runs := pr.runs[f.data]
		o := outcomes[i]
		hasGroupFailure := false
		for _, fl := range o.ack.Failures {
			if fl.Group == "g" {
				hasGroupFailure = true
			}
		}
		switch {
		case o.err != nil:
			rejected++
		case hasGroupFailure:
			groupFailed++
		default:
			claimed++
			if len(runs) == 0 && o.ack.Status == pubsub.Accepted {
				unclaimed = append(unclaimed, fmt.Sprintf("%s ack %+v", f.data, o.ack))
			}
		}
		if len(runs) < 2 {
			continue
		}
		sort.Slice(runs, func(a, b int) bool { return runs[a].at.Before(runs[b].at) })
		var who []string
		for _, r := range runs {
			who = append(who, fmt.Sprintf("%s@%s[%s]", r.member, r.at.Format("15:04:05.000"), r.phase))
		}
		// The first attempt may have been accepted a few retries before
		// the first run; the change must come before the last run.
		chs := changeBetween(runs[0].at.Add(-3*publishTimeout), runs[len(runs)-1].at)
		line := fmt.Sprintf("%s (%d runs: %s) err=%v", f.data, len(runs), strings.Join(who, " "), o.err)
		if len(chs) > 0 {
			insideN[runs[0].phase]++
			inside = append(inside, line+" changes: "+strings.Join(chs, "; "))
		} else {
			outsideN[runs[0].phase]++
			outside = append(outside, line)
		}
	}
	t.Logf("messages %d: claimed delivered %d, group failure listed %d, rejected %d", len(all), claimed, groupFailed, rejected)
	t.Logf("producer retries per phase: %v", pr.retries)
	t.Logf("double-runs inside the exceptions: %d %v", len(inside), insideN)
	t.Logf("double-runs outside the exceptions: %d %v", len(outside), outsideN)
	for i, l := range inside {
		if i == 20 {
			t.Logf("... %d more inside", len(inside)-20)
			break
		}
		t.Logf("inside: %s", l)
	}
	var chLines []string
	sort.Slice(pr.changes, func(a, b int) bool { return pr.changes[a].at.Before(pr.changes[b].at) })
	for _, ch := range pr.changes {
		chLines = append(chLines, ch.at.Format("15:04:05.000")+" "+ch.what)
	}
	if len(chLines) > 80 {
		chLines = append(chLines[:80], fmt.Sprintf("... %d more", len(chLines)-80))
	}
	t.Logf("changes:\n%s", strings.Join(chLines, "\n"))
	for i, l := range outside {
		if i == 30 {
			t.Errorf("... %d more outside", len(outside)-30)
			break
		}
		t.Errorf("double-run outside the stated exceptions: %s", l)
	}
	if len(unclaimed) > 0 {
		t.Errorf("%d accepted acks list no group failure but no member ran the message, e.g. %v", len(unclaimed), unclaimed[:min(5, len(unclaimed))])
	}
}
