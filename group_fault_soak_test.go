//go:build soak

package pubsub_test

// Network faults against a consumer group fed by BatchingProducers, at
// both delivery modes, keyed and keyless: one-way route stalls between the
// owner's server and a member's server, a member's client connection cut
// or stalled, the owner's connection stalled outbound, the owner's server
// lost; and a KeepMajority partition with broadcast subscribers beside the
// group and producers on both sides. Each message's runs are recorded per
// subscriber, and every producer future and direct publish is checked
// against them: an accepted ack counts no more subscribers than ran the
// message (a group counting once), one that does not count the group
// lists its failure, a rejection that says nothing was published names a
// message nobody ran, and at most once nothing runs twice. After the heal
// the topic must serve again within 2 x MemberTimeout, every subscription
// still live receiving, and every ended one saying why (guarantee 9).

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// gfProbe records what the subscribers of one topic ran: the members of
// group "g" and, if asked, a broadcast subscriber per node.
type gfProbe struct {
	t     *testing.T
	c     *testcluster.Cluster
	topic string
	keyed bool
	mode  pubsub.DeliveryMode

	mu    sync.Mutex
	runs  map[string][]string         // message -> group members that ran it, in order
	bcast map[string]map[string]int   // message -> broadcast subscriber -> runs
	order map[string]map[string][]int // member -> producer|key -> seqs, in run order

	members map[int]*pubsub.Subscription // by node index
	bsubs   map[int]*pubsub.Subscription // broadcast subscribers, by node index

	futMu sync.Mutex
	futs  []gfFuture
	acks  []gfAck // direct publishes
}

type gfFuture struct {
	from int
	m    string
	f    *pubsub.Produced
}

type gfAck struct {
	msgs []string
	ack  pubsub.PublishAck
	err  error
}

func newGFProbe(t *testing.T, c *testcluster.Cluster, topic string, mode pubsub.DeliveryMode, keyed, broadcast bool) *gfProbe {
	p := &gfProbe{t: t, c: c, topic: topic, keyed: keyed, mode: mode, runs: map[string][]string{},
		bcast: map[string]map[string]int{}, order: map[string]map[string][]int{},
		members: map[int]*pubsub.Subscription{}, bsubs: map[int]*pubsub.Subscription{}}
	for k, n := range c.Nodes {
		s, err := n.Subscribe(ctxT(t), topic, p.handler, pubsub.WithGroup("g"))
		require.NoError(t, err)
		p.members[k] = s
		if broadcast {
			p.bsubs[k] = subscribe(t, n, topic, p.handler)
		}
	}
	return p
}

func (p *gfProbe) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	if !strings.HasSuffix(id.Local, "@g") {
		bs := p.bcast[string(m.Data)]
		if bs == nil {
			bs = map[string]int{}
			p.bcast[string(m.Data)] = bs
		}
		bs[id.String()]++
		return nil
	}
	p.runs[string(m.Data)] = append(p.runs[string(m.Data)], id.String())
	var from, seq int
	if _, err := fmt.Sscanf(string(m.Data), "p%d-%d", &from, &seq); err == nil {
		mk := p.order[id.String()]
		if mk == nil {
			mk = map[string][]int{}
			p.order[id.String()] = mk
		}
		k := fmt.Sprintf("%d|%s", from, m.Key)
		mk[k] = append(mk[k], seq)
	}
	return nil
}

// produce runs a producer on node from until the returned stop is called;
// stop flushes and closes it.
func (p *gfProbe) produce(from int) (stop func()) {
	t := p.t
	prod, err := pubsub.NewBatchingProducer(p.c.Nodes[from], p.topic, pubsub.ProducerConfig{
		BatchSize: 20, Linger: 2 * time.Millisecond, MaxInFlight: 4,
		// No retries: a retry may be assigned anew (a known limit), and
		// then at most once cannot be checked per message.
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue },
	})
	require.NoError(t, err)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		// 20 messages every 5 ms at most: enough to have batches in
		// flight when a fault hits, without flooding a -race build.
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			if i%20 == 0 {
				select {
				case <-done:
					return
				case <-tick.C:
				}
			}
			m := fmt.Sprintf("p%d-%d", from, i)
			out := pubsub.Outgoing{Data: []byte(m)}
			if p.keyed {
				out.Key = fmt.Sprintf("k%d", i%11)
			}
			f := prod.ProduceMessage(context.Background(), out)
			p.futMu.Lock()
			p.futs = append(p.futs, gfFuture{from, m, f})
			p.futMu.Unlock()
			if i%20 == 19 { // pace: a few batches at a time
				select {
				case <-f.Done():
				case <-done:
					return
				}
			}
		}
	})
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			wg.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			assert.NoError(t, prod.Flush(ctx), "flush")
			assert.NoError(t, prod.Close(ctx), "close")
		})
	}
}

func (p *gfProbe) produced(from int) int {
	p.futMu.Lock()
	defer p.futMu.Unlock()
	n := 0
	for _, f := range p.futs {
		if f.from == from {
			n++
		}
	}
	return n
}

func (p *gfProbe) futures() []gfFuture {
	p.futMu.Lock()
	defer p.futMu.Unlock()
	return append([]gfFuture(nil), p.futs...)
}

// ran reports whether subscription s ran any of msgs.
func (p *gfProbe) ran(s *pubsub.Subscription, msgs []string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	id := s.ID().String()
	for _, m := range msgs {
		if s.Group() != "" {
			for _, r := range p.runs[m] {
				if r == id {
					return true
				}
			}
		} else if p.bcast[m][id] > 0 {
			return true
		}
	}
	return false
}

// publishMarkers publishes one batch of 30 markers from node from, records
// its ack and returns it with the markers' names.
func (p *gfProbe) publishMarkers(from int, tag string, timeout time.Duration) ([]string, pubsub.PublishAck, error) {
	var out []pubsub.Outgoing
	var names []string
	for j := range 30 {
		m := fmt.Sprintf("%s-%d", tag, j)
		names = append(names, m)
		o := pubsub.Outgoing{Data: []byte(m)}
		if p.keyed {
			o.Key = m
		}
		out = append(out, o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	ack, err := p.c.Nodes[from].PublishMessages(ctx, p.topic, out)
	cancel()
	p.futMu.Lock()
	p.acks = append(p.acks, gfAck{names, ack, err})
	p.futMu.Unlock()
	return names, ack, err
}

// waitServing publishes marker batches from node from until one is
// accepted with every live broadcast subscriber and the group delivered
// and no failure, and every subscription not excluded and still live has
// run a marker; it fails t past within.
func (p *gfProbe) waitServing(from int, within time.Duration, exclude ...int) time.Duration {
	t := p.t
	start := time.Now()
	deadline := start.Add(within)
	var sent []string
	served := false
	for round := 0; ; round++ {
		live := 1 // the group
		for k, s := range p.bsubs {
			if !containsInt(exclude, k) && !isDone(s) {
				live++
			}
		}
		names, ack, err := p.publishMarkers(from, fmt.Sprintf("h%d-%d", from, round), time.Until(deadline)+time.Second)
		sent = append(sent, names...)
		if err == nil && ack.Delivered == live && len(ack.Failures) == 0 {
			served = true
		}
		var missing []string
		for _, subs := range []map[int]*pubsub.Subscription{p.members, p.bsubs} {
			for k, s := range subs {
				if !containsInt(exclude, k) && !isDone(s) && !p.ran(s, sent) {
					missing = append(missing, s.ID().String())
				}
			}
		}
		if err == nil && ack.Delivered < live && len(ack.Failures) == 0 {
			var got []string
			for _, subs := range []map[int]*pubsub.Subscription{p.members, p.bsubs} {
				for k, s := range subs {
					if p.ran(s, names) {
						got = append(got, fmt.Sprintf("n%d:%s", k, s.ID()))
					}
				}
			}
			owners := ""
			for k, n := range p.c.Nodes {
				o, oerr := n.OwnerOf(p.topic)
				owners += fmt.Sprintf(" n%d->%s%v(%d members)", k, o.ID, oerr, len(n.Members()))
			}
			t.Logf("heal window: %s round %d at +%v: ack %+v; ran at %v; owners%s", p.topic, round, time.Since(start), ack, got, owners)
		}
		if served && len(missing) == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not served from n%d within %v of the heal: last ack %+v err %v (want %d delivered); live subscriptions that ran no marker %v",
				p.topic, from, within, ack, err, live, missing)
		}
	}
}

func isDone(s *pubsub.Subscription) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

// check compares every future and direct publish with the runs, checks
// each subscription is live or ended with an error, and counts per-key
// inversions at each member (failing t on any when wantOrder).
func (p *gfProbe) check(wantOrder bool) {
	t := p.t
	futs := p.futures()
	p.futMu.Lock()
	acks := append([]gfAck(nil), p.acks...)
	p.futMu.Unlock()
	for _, x := range futs {
		ack, err, ok := x.f.Result()
		if !assert.True(t, ok, "future of %s never completed", x.m) {
			continue
		}
		acks = append(acks, gfAck{[]string{x.m}, ack, err})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	accepted, groupFailed, rejected, bad := 0, 0, 0, 0
	reasons := map[pubsub.Reason]int{}
	report := func(format string, args ...any) {
		bad++
		if bad <= 10 {
			t.Errorf(format, args...)
		}
	}
	for _, a := range acks {
		if a.err != nil {
			rejected++
			reasons[a.ack.Reason]++
			if a.ack.Reason == pubsub.ReasonTopicUnavailable {
				// Nothing was published: nobody may have run it.
				for _, m := range a.msgs {
					if len(p.runs[m]) > 0 || len(p.bcast[m]) > 0 {
						report("%s rejected %v (nothing published) but ran at %v %v", m, a.err, p.runs[m], p.bcast[m])
					}
				}
			}
			continue
		}
		accepted++
		gf := false
		for _, f := range a.ack.Failures {
			if f.Group == "g" {
				gf = true
			}
		}
		if gf {
			groupFailed++
		}
		if a.ack.Level != pubsub.AckDelivered {
			continue
		}
		for _, m := range a.msgs {
			ran := len(p.bcast[m])
			if len(p.runs[m]) > 0 {
				ran++
			}
			if a.ack.Delivered > ran {
				report("ack %+v counts %d delivered, but %s ran at %d (group %v, broadcast %v)", a.ack, a.ack.Delivered, m, ran, p.runs[m], p.bcast[m])
			}
			if !gf && len(p.runs[m]) == 0 {
				report("ack %+v lists no group failure, but no member ran %s", a.ack, m)
			}
		}
	}
	twice := 0
	if p.mode == pubsub.AtMostOnce {
		for m, r := range p.runs {
			if len(r) > 1 {
				twice++
				report("at most once: group ran %s %d times: %v", m, len(r), r)
			}
		}
		for m, bs := range p.bcast {
			for id, n := range bs {
				if n > 1 {
					twice++
					report("at most once: %s ran %s %d times", id, m, n)
				}
			}
		}
	}
	inversions := 0
	for member, keys := range p.order {
		for key, seqs := range keys {
			for i := 1; i < len(seqs); i++ {
				if seqs[i] <= seqs[i-1] {
					inversions++
					if wantOrder && inversions <= 5 {
						t.Errorf("member %s ran producer|key %s seq %d after %d", member, key, seqs[i], seqs[i-1])
					}
				}
			}
		}
	}
	for _, subs := range []map[int]*pubsub.Subscription{p.members, p.bsubs} {
		for k, s := range subs {
			if isDone(s) {
				assert.Error(t, s.Err(), "%s on n%d ended without saying why", s.ID(), k)
				t.Logf("%s on n%d ended: %v", s.ID(), k, s.Err())
			}
		}
	}
	t.Logf("%s: %d acks accepted (%d listing a group failure), %d rejected %v; %d messages run by the group, %d ran twice, %d per-key inversions; %d bad",
		p.topic, accepted, groupFailed, rejected, reasons, len(p.runs), twice, inversions, bad)
}

// gfCase is one fault: inject starts it, heal ends it (after hold).
type gfCase struct {
	name      string
	hold      time.Duration
	inject    func(c *testcluster.Cluster)
	heal      func(t *testing.T, c *testcluster.Cluster)
	exclude   []int // nodes whose own fault never ends
	wantOrder bool  // no membership change and no re-route: per-key order holds
}

func healAll(_ *testing.T, c *testcluster.Cluster) { c.HealAll() }

func runGroupFaultHeal(t *testing.T, mode pubsub.DeliveryMode, keyed bool, tc gfCase) {
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...),
		pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))...)
	c.WaitConverged(t, 10*time.Second)
	p := newGFProbe(t, c, ownedBy(t, c.Nodes[1], "gf"), mode, keyed, false)
	stop := p.produce(0)
	defer stop()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return p.produced(0) >= 200 }, "no progress before the fault")
	tc.inject(c)
	time.Sleep(tc.hold) // the fault's duration is the point here
	tc.heal(t, c)
	healed := p.waitServing(0, 2*faultMemberTimeout, tc.exclude...)
	t.Logf("group served every live member %v after the heal", healed)
	at := p.produced(0)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return p.produced(0) >= at+100 }, "producer makes no progress after the heal")
	stop()
	p.check(tc.wantOrder)
}

func TestSoakGroupFaultsHeal(t *testing.T) {
	cases := []gfCase{
		{name: "stall-owner-to-member-short", hold: time.Second, wantOrder: true,
			inject: func(c *testcluster.Cluster) { c.StallRoute(1, 2) }, heal: healAll},
		{name: "stall-owner-to-member-long", hold: 2500 * time.Millisecond,
			inject: func(c *testcluster.Cluster) { c.StallRoute(1, 2) }, heal: healAll},
		{name: "stall-member-to-owner-long", hold: 2500 * time.Millisecond,
			inject: func(c *testcluster.Cluster) { c.StallRoute(2, 1) }, heal: healAll},
		{name: "member-client-cut-short", hold: time.Second, wantOrder: true,
			inject: func(c *testcluster.Cluster) { c.Client(2).Cut() }, heal: healAll},
		{name: "member-client-cut-long", hold: 2500 * time.Millisecond,
			inject: func(c *testcluster.Cluster) { c.Client(2).Cut() }, heal: healAll},
		{name: "member-client-stall-in-long", hold: 2500 * time.Millisecond,
			inject: func(c *testcluster.Cluster) { c.Client(2).Stall(faultnet.Backward) }, heal: healAll},
		{name: "owner-client-stall-out-long", hold: 2500 * time.Millisecond,
			inject: func(c *testcluster.Cluster) { c.Client(1).Stall(faultnet.Forward) }, heal: healAll},
		{name: "owner-server-lost", exclude: []int{1},
			inject: func(c *testcluster.Cluster) { c.ShutdownServer(1) },
			heal: func(t *testing.T, c *testcluster.Cluster) {
				c.WaitConverged(t, 3*faultMemberTimeout, 0, 2)
				c.Crash(1) // it never comes back: stop it now, not in the cleanup's Close
			}},
	}
	// Keyed and keyless alternate over the cases, and swap between the
	// modes, so that each fault meets each combination once in two.
	for m, mode := range []pubsub.DeliveryMode{pubsub.AtMostOnce, pubsub.AtLeastOnce} {
		for i, tc := range cases {
			keyed := (i+m)%2 == 0 || tc.wantOrder
			t.Run(fmt.Sprintf("%v/keyed=%v/%s", mode, keyed, tc.name), func(t *testing.T) { runGroupFaultHeal(t, mode, keyed, tc) })
		}
	}
}

// Under KeepMajority, server 2 is cut off from the others: n2, alone, must
// reject its producers' publishes (ReasonTopicUnavailable, nothing run
// anywhere) to the topic it owned and to one the majority owns, while the
// majority serves both; after the heal n2's publishes reach every
// broadcast subscriber and the group again within 2 x MemberTimeout.
func TestSoakGroupKeepMajorityMinorityProducer(t *testing.T) {
	for _, mode := range []pubsub.DeliveryMode{pubsub.AtLeastOnce} {
		t.Run(mode.String(), func(t *testing.T) {
			c := testcluster.NewFaulty(t, 3, 3, append(keepMajorityOpts(),
				pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return mode }))...)
			c.WaitConverged(t, 10*time.Second)
			minT := newGFProbe(t, c, ownedBy(t, c.Nodes[2], "kmin"), mode, true, true)
			majT := newGFProbe(t, c, ownedBy(t, c.Nodes[0], "kmaj"), mode, false, true)
			stops := []func(){minT.produce(2), minT.produce(0), majT.produce(2)}
			defer func() {
				for _, s := range stops {
					s()
				}
			}()
			testcluster.WaitFor(t, 5*time.Second, func() bool { return minT.produced(2) >= 100 && majT.produced(2) >= 100 },
				"no progress before the fault")

			isolateServer(c, 2)
			testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool {
				return !c.Nodes[2].Stats().HasQuorum && len(c.Nodes[0].Members()) == 2 && c.Nodes[0].Stats().HasQuorum
			}, "n2 keeps its quorum or the majority does not form: n2 sees %v, n0 sees %v", c.Nodes[2].Members(), c.Nodes[0].Members())
			fromMin, fromMaj := len(minT.futures()), len(majT.futures())
			// While cut: n2's direct publishes are rejected, the majority serves.
			for _, p := range []*gfProbe{minT, majT} {
				_, ack, err := p.publishMarkers(2, "cut-n2-"+p.topic, 5*time.Second)
				require.ErrorIs(t, err, pubsub.ErrTopicUnavailable, "n2 publishing to %s while cut: %+v", p.topic, ack)
				assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
			}
			majServes := func(p *gfProbe) bool {
				_, ack, err := p.publishMarkers(0, fmt.Sprintf("cut-n0-%d", time.Now().UnixNano()), 5*time.Second)
				return err == nil && ack.Delivered == 3 && len(ack.Failures) == 0 // n0, n1 broadcast + the group
			}
			testcluster.WaitFor(t, 2*faultMemberTimeout, func() bool { return majServes(minT) && majServes(majT) },
				"the majority does not serve both topics while n2 is cut off")
			// n2's producers run into the cut until some of their futures
			// settled on each topic: the checks below must have something
			// to check.
			since := func(p *gfProbe) int {
				if p == minT {
					return fromMin
				}
				return fromMaj
			}
			settledFromN2 := func(p *gfProbe) (n int) {
				for _, x := range p.futures()[since(p):] {
					if _, _, ok := x.f.Result(); ok && x.from == 2 {
						n++
					}
				}
				return n
			}
			testcluster.WaitFor(t, 10*time.Second, func() bool { return settledFromN2(minT) > 0 && settledFromN2(majT) > 0 },
				"no future of n2's producers settled while it was cut off")
			for _, p := range []*gfProbe{minT, majT} {
				from := since(p)
				n := 0
				for _, x := range p.futures()[from:] {
					ack, err, ok := x.f.Result()
					if !ok || x.from != 2 {
						continue
					}
					n++
					if assert.Error(t, err, "n2's %s accepted while cut off: %+v", x.m, ack) {
						assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason, "n2's %s: %v", x.m, err)
					}
				}
				t.Logf("%s: %d of n2's futures done while cut off", p.topic, n)
			}

			c.HealAll()
			c.WaitMeshed(t, 2*faultMemberTimeout)
			for _, p := range []*gfProbe{minT, majT} {
				healed := p.waitServing(2, 2*faultMemberTimeout)
				t.Logf("%s served from n2 %v after the mesh healed", p.topic, healed)
			}
			at := minT.produced(2)
			testcluster.WaitFor(t, 5*time.Second, func() bool { return minT.produced(2) >= at+100 }, "n2's producer makes no progress after the heal")
			for _, s := range stops {
				s()
			}
			minT.check(false)
			majT.check(false)
		})
	}
}
