//go:build soak

package pubsub_test

// Soak: BatchingProducers and direct publishes at every ack level under
// KeepMajority partitions. 5 nodes on 3 servers (n0, n3 on s0; n1, n4 on
// s1; n2 on s2); topic tA owned by n0, tB by n1; on every node a broadcast
// subscriber and a member of group "g" of both topics; producers on n3 and
// n4 to both topics (MaxInFlight > 1, RetryBatch / FailBatchAndContinue,
// some with per-message deadlines); direct publishes from n0, n3, n2, n4.
//
// Checked: the minority's direct publishes (AckDelivered, AckAccepted) are
// rejected with ErrTopicUnavailable once its views show the partition;
// each broadcast subscriber sees each producer's messages in order without
// repeats (a group member's order is not kept through a re-route or a
// membership change, README "Consumer groups": its inversions are counted
// and logged); a group runs a message at most once; an AckDelivered ack's Delivered
// never exceeds the broadcast subscribers plus groups that ran the message;
// a Rejected outcome other than ReasonTimeout belongs to no message any
// handler ran; every future completes; after the heal every topic serves
// and every live subscription receives the next publish.

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
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

type kmRec struct {
	mu    sync.Mutex
	who   map[string]map[pubsub.SubscriberID]int // message -> subscriber -> runs
	order map[string][]int                       // subscriber|producer -> indices
	bad   []string
	// groupInversions: a group member handed a producer's message after a
	// later one (a re-route or a membership change moved its key).
	groupInversions int
	total           atomic.Int64
}

func (r *kmRec) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	s := string(m.Data)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.who[s] == nil {
		r.who[s] = map[pubsub.SubscriberID]int{}
	}
	r.who[s][id]++
	r.total.Add(1)
	if src, idx, ok := strings.Cut(s, "#"); ok {
		i, _ := strconv.Atoi(idx)
		k := id.String() + "|" + src
		if o := r.order[k]; len(o) > 0 && o[len(o)-1] >= i {
			switch {
			case id.Group() != "":
				r.groupInversions++
			case len(r.bad) < 20:
				r.bad = append(r.bad, fmt.Sprintf("%v: %s#%d after #%d", id, src, i, o[len(o)-1]))
			}
		}
		r.order[k] = append(r.order[k], i)
	}
	return nil
}

// ran returns the broadcast subscribers plus the groups that ran s, and
// whether some group ran it twice.
func (r *kmRec) ran(s string) (count int, groupTwice bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	groups := map[string]int{}
	for id, n := range r.who[s] {
		if g := id.Group(); g != "" {
			groups[g] += n
		} else {
			count++
		}
	}
	for _, n := range groups {
		count++
		if n > 1 {
			groupTwice = true
		}
	}
	return count, groupTwice
}

type kmOutcome struct {
	name  string
	level pubsub.AckLevel
	fut   *pubsub.Produced
	ack   pubsub.PublishAck
	err   error
}

func kmCheck(t *testing.T, rec *kmRec, o kmOutcome) {
	ack, err := o.ack, o.err
	n, twice := rec.ran(o.name)
	if twice {
		rec.mu.Lock()
		t.Errorf("%s: a group ran it more than once: runs %v; outcome %v/%v %v failures %v", o.name, rec.who[o.name], ack.Status, ack.Reason, err, ack.Failures)
		rec.mu.Unlock()
	}
	if err == nil && ack.Status == pubsub.Accepted {
		if o.level == pubsub.AckDelivered && ack.Delivered > n {
			t.Errorf("%s: ack Delivered %d but %d ran it; failures %v", o.name, ack.Delivered, n, ack.Failures)
		}
		return
	}
	if err == nil {
		t.Errorf("%s: nil error with status %v", o.name, ack.Status)
		return
	}
	if !errors.Is(err, ack.Reason.Err()) {
		t.Errorf("%s: error %v does not wrap its reason %v", o.name, err, ack.Reason)
	}
	if ack.Reason != pubsub.ReasonTimeout && n > 0 {
		t.Errorf("%s: Rejected %v (%v) but %d subscribers/groups ran it", o.name, ack.Reason, err, n)
	}
}

type kmFault struct {
	name string
	// run starts the fault, checks it and heals it; minority lists the
	// nodes that must not serve while it lasts (nil: not asserted).
	run func(t *testing.T, c *testcluster.Cluster, direct func(n int) error)
}

func TestSoakKeepMajorityProducers(t *testing.T) {
	faults := []kmFault{
		{"clean", func(t *testing.T, c *testcluster.Cluster, direct func(int) error) {
			n := c.Nodes
			isolateServer(c, 0)
			waitViews(t, []*pubsub.Node{n[0], n[3]}, []*pubsub.Node{n[1], n[2], n[4]})
			kmMinorityRejects(t, c, direct, 0, 3)
		}},
		{"repartition", func(t *testing.T, c *testcluster.Cluster, direct func(int) error) {
			n := c.Nodes
			isolateServer(c, 0)
			waitViews(t, []*pubsub.Node{n[0], n[3]}, []*pubsub.Node{n[1], n[2], n[4]})
			kmMinorityRejects(t, c, direct, 0, 3)
			c.HealAll()
			c.WaitMeshed(t, 10*time.Second)
			c.WaitConverged(t, 3*faultMemberTimeout)
			isolateServer(c, 1)
			a, b := []*pubsub.Node{n[1], n[4]}, []*pubsub.Node{n[0], n[2], n[3]}
			waitViews(t, a, b)
			requireNeverBothSidesServe(t, a, b, time.Second)
			c.HealAll()
			c.WaitMeshed(t, 10*time.Second)
			c.WaitConverged(t, 3*faultMemberTimeout)
			isolateServer(c, 0)
			waitViews(t, []*pubsub.Node{n[0], n[3]}, []*pubsub.Node{n[1], n[2], n[4]})
			kmMinorityRejects(t, c, direct, 0, 3)
		}},
		{"flap", func(t *testing.T, c *testcluster.Cluster, direct func(int) error) {
			// cuts shorter than MemberTimeout, healed and re-cut at once,
			// then one held until the views split.
			hold := func(d time.Duration) {
				end := time.Now().Add(d)
				testcluster.WaitFor(t, d+time.Second, func() bool { return time.Now().After(end) }, "")
			}
			isolateServer(c, 0)
			hold(time.Second)
			c.HealAll()
			hold(300 * time.Millisecond)
			t.Logf("%s isolate s1", time.Now().Format("05.000"))
			isolateServer(c, 1)
			hold(1500 * time.Millisecond)
			t.Logf("%s heal s1", time.Now().Format("05.000"))
			c.HealAll()
			hold(200 * time.Millisecond)
			isolateServer(c, 0)
			n := c.Nodes
			waitViews(t, []*pubsub.Node{n[0], n[3]}, []*pubsub.Node{n[1], n[2], n[4]})
			kmMinorityRejects(t, c, direct, 0, 3)
		}},
		{"oneway-rev", func(t *testing.T, c *testcluster.Cluster, direct func(int) error) {
			c.StallRoute(1, 0)
			end := time.Now().Add(2*faultMemberTimeout + time.Second)
			testcluster.WaitFor(t, 3*faultMemberTimeout+5*time.Second, func() bool { return time.Now().After(end) }, "")
			t.Logf("during the stall: %s", quorumOf(c.Nodes))
		}},
		{"oneway", func(t *testing.T, c *testcluster.Cluster, direct func(int) error) {
			c.StallRoute(0, 1)
			// hold it past MemberTimeout and the disagreement grace
			deadline := time.Now().Add(2*faultMemberTimeout + time.Second)
			testcluster.WaitFor(t, 3*faultMemberTimeout+5*time.Second, func() bool {
				return time.Now().After(deadline)
			}, "")
			t.Logf("during the stall: %s", quorumOf(c.Nodes))
		}},
	}
	for _, f := range faults {
		for _, lvl := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
			t.Run(f.name+"/"+lvl.String(), func(t *testing.T) { kmRun(t, f, lvl) })
		}
	}
}

// kmMinorityRejects waits until the minority nodes lost their quorum and
// checks their direct publishes to both topics are refused.
func kmMinorityRejects(t *testing.T, c *testcluster.Cluster, direct func(int) error, minority ...int) {
	t.Helper()
	for _, i := range minority {
		testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return !c.Nodes[i].Stats().HasQuorum },
			"minority still serves: %s", quorumOf(c.Nodes))
	}
	for _, i := range minority {
		if err := direct(i); err != nil {
			t.Error(err)
		}
	}
}

func kmRun(t *testing.T, f kmFault, lvl pubsub.AckLevel) {
	c := testcluster.NewFaulty(t, 3, 5, keepMajorityOpts()...)
	c.WaitConverged(t, 10*time.Second)
	waitStableEverywhere(t, c.Nodes, 5)
	n := c.Nodes
	topics := []string{ownedBy(t, n[0], "kmA"), ownedBy(t, n[1], "kmB")}
	rec := &kmRec{who: map[string]map[pubsub.SubscriberID]int{}, order: map[string][]int{}}
	var subs []*pubsub.Subscription
	for _, topic := range topics {
		for _, node := range n {
			subs = append(subs, subscribe(t, node, topic, rec.handler))
			s, err := node.Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
			if err != nil {
				t.Fatal(err)
			}
			subs = append(subs, s)
		}
	}
	var evMu sync.Mutex
	var evs []string
	for _, node := range n[:0] { // events perturb the timing: the flap failure vanished with listeners on
		cancel := node.Events().Subscribe(func(e pubsub.Event) {
			var line string
			switch e := e.(type) {
			case pubsub.SubscriberEvicted:
				line = fmt.Sprintf("%s %s evicted %v from %s: %v", e.Time.Format("05.000"), e.Node, e.Subscriber, e.Topic, e.Status)
			case pubsub.SubscriberRemoved:
				line = fmt.Sprintf("%s %s removed %v from %s", e.Time.Format("05.000"), e.Node, e.Subscriber, e.Topic)
			case pubsub.SubscriberAdded:
				line = fmt.Sprintf("%s %s added %v to %s", e.Time.Format("05.000"), e.Node, e.Subscriber, e.Topic)
			case pubsub.TopicOwnerChanged:
				line = fmt.Sprintf("%s %+v", time.Now().Format("05.000"), e)
			case pubsub.MemberLeft:
				line = fmt.Sprintf("%s %s: %s left", e.Time.Format("05.000"), e.Node, e.Member.ID)
			case pubsub.MemberJoined:
				line = fmt.Sprintf("%s %s: %s joined", e.Time.Format("05.000"), e.Node, e.Member.ID)
			default:
				return
			}
			evMu.Lock()
			evs = append(evs, line)
			evMu.Unlock()
		})
		t.Cleanup(cancel)
	}
	defer func() {
		if t.Failed() {
			evMu.Lock()
			for _, l := range evs {
				if strings.Contains(l, "kmB") || strings.Contains(l, "left") || strings.Contains(l, "joined") {
					t.Log(l)
				}
			}
			evMu.Unlock()
		}
	}()
	var mu sync.Mutex
	var outcomes []kmOutcome
	record := func(o kmOutcome) {
		mu.Lock()
		outcomes = append(outcomes, o)
		mu.Unlock()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var producers []*pubsub.BatchingProducer
	// producers: on n3 (minority of the s0 cut) and n4, to both topics.
	for pi, spec := range []struct {
		node, topic int
		retry       bool
		deadlines   bool
	}{{3, 0, true, false}, {3, 1, false, true}, {4, 0, false, false}, {4, 1, true, true}} {
		retry := spec.retry
		p, err := pubsub.NewBatchingProducer(n[spec.node], topics[spec.topic], pubsub.ProducerConfig{
			AckLevel: lvl, MaxInFlight: 3, BatchSize: 20, Linger: time.Millisecond,
			OnPublishError: func(attempt int, err error) pubsub.ErrorDecision {
				if retry && attempt < 50 {
					return pubsub.RetryBatch(50 * time.Millisecond)
				}
				return pubsub.FailBatchAndContinue
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		producers = append(producers, p)
		deadlines := spec.deadlines
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(pi), 1))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond): // pacing the load, not synchronisation
				}
				name := fmt.Sprintf("P%d#%d", pi, i)
				ctx := context.Background()
				if deadlines && i%3 == 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, time.Duration(rng.IntN(2000))*time.Millisecond)
					defer cancel()
				}
				fut := p.ProduceMessage(ctx, pubsub.Outgoing{Data: []byte(name), Key: "k" + strconv.Itoa(i%8)})
				record(kmOutcome{name: name, level: lvl, fut: fut})
			}
		})
	}
	// direct publishes from every node to both topics, sequential per node.
	var dseq atomic.Int64
	directOnce := func(node, topic int) (string, pubsub.PublishAck, error) {
		name := fmt.Sprintf("D%d-%d#%d", node, topic, dseq.Add(1))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ack, err := n[node].PublishMessages(ctx, topics[topic], []pubsub.Outgoing{{Data: []byte(name), Key: "d"}}, pubsub.WithAck(lvl))
		record(kmOutcome{name: name, level: lvl, ack: ack, err: err})
		return name, ack, err
	}
	for _, node := range []int{0, 2, 3, 4} {
		wg.Go(func() {
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
				directOnce(node, k%2)
			}
		})
	}
	testcluster.WaitFor(t, 20*time.Second, func() bool { return rec.total.Load() > 500 }, "no traffic before the fault")
	direct := func(node int) error {
		if lvl == pubsub.AckNone {
			for topic := range topics {
				name, ack, err := directOnce(node, topic)
				t.Logf("minority AckNone publish %s from n%d: %v %v", name, node, ack.Status, err)
			}
			return nil
		}
		for topic := range topics {
			name, ack, err := directOnce(node, topic)
			if !errors.Is(err, pubsub.ErrTopicUnavailable) {
				return fmt.Errorf("minority publish %s from %s to %s: ack %v/%v err %v, want ErrTopicUnavailable (%s)",
					name, n[node].ID(), topics[topic], ack.Status, ack.Reason, err, quorumOf(n))
			}
		}
		return nil
	}
	f.run(t, c, direct)
	healAt := time.Now()
	c.HealAll()
	c.WaitMeshed(t, 10*time.Second)
	c.WaitConverged(t, 3*faultMemberTimeout)
	waitStableEverywhere(t, c.Nodes, 5)
	t.Logf("stable %v after the heal", time.Since(healAt))
	// some traffic after the heal, then stop
	after := rec.total.Load()
	testcluster.WaitFor(t, 20*time.Second, func() bool { return rec.total.Load() > after+300 }, "no traffic after the heal")
	close(stop)
	wg.Wait()
	for i, p := range producers {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := p.Flush(ctx); err != nil {
			t.Errorf("producer %d Flush: %v", i, err)
		}
		if err := p.Close(ctx); err != nil {
			t.Errorf("producer %d Close: %v", i, err)
		}
		cancel()
	}
	// every future completes
	mu.Lock()
	all := append([]kmOutcome(nil), outcomes...)
	mu.Unlock()
	stats := map[string]int{}
	for i := range all {
		o := &all[i]
		if o.fut != nil {
			select {
			case <-o.fut.Done():
			case <-time.After(30 * time.Second):
				t.Fatalf("%s: future pending 30 s after Close", o.name)
			}
			o.ack, o.err, _ = o.fut.Result()
		}
	}
	// fence: after the heal every topic serves every live subscriber; an
	// AckDelivered publish also comes after every accepted batch at it.
	for ti, topic := range topics {
		want := 0
		for _, s := range subs {
			if s.Topic() == topic && s.Group() == "" {
				select {
				case <-s.Done():
					t.Logf("%v ended: %v", s.ID(), s.Err())
					if s.Err() == nil {
						t.Errorf("%v ended without an error", s.ID())
					}
				default:
					want++
				}
			}
		}
		deadline := time.Now().Add(2 * faultMemberTimeout)
		for {
			ack, err := n[(ti+2)%5].Publish(ctxT(t), topic, []byte("fence"))
			if err == nil && ack.Delivered == want+1 && len(ack.Failures) == 0 {
				break
			}
			if time.Now().After(deadline) {
				ts, serr := n[(ti+2)%5].TopicStats(ctxT(t), topic)
				t.Errorf("fence to %s (owner per n%d: %v) not accepted with %d deliveries in %v: ack %+v err %v; owner's stats %+v %v",
					topic, (ti+2)%5, func() string { o, _ := n[(ti+2)%5].OwnerOf(topic); return o.ID }(), want+1, 2*faultMemberTimeout, ack, err, ts, serr)
				// does it recover later?
				for start := time.Now(); time.Since(start) < 20*time.Second; {
					ack, err := n[(ti+2)%5].Publish(ctxT(t), topic, []byte("late"))
					if err == nil && ack.Delivered == want+1 {
						t.Logf("recovered %v after the fence gave up", time.Since(start))
						break
					}
				}
				break
			}
		}
	}
	for _, o := range all {
		kind := o.name[:1]
		stats[kind+":"+o.ack.Status.String()+"/"+o.ack.Reason.String()]++
		kmCheck(t, rec, o)
	}
	rec.mu.Lock()
	for _, b := range rec.bad {
		t.Errorf("order: %s", b)
	}
	if rec.groupInversions > 0 {
		t.Logf("group members' order inversions (re-routes, membership changes): %d", rec.groupInversions)
	}
	for _, s := range subs {
		if s.Group() != "" {
			continue
		}
		select {
		case <-s.Done():
		default:
			if rec.who["fence"][s.ID()] == 0 {
				t.Errorf("%v (topic %s) live but never got the fence", s.ID(), s.Topic())
			}
		}
	}
	rec.mu.Unlock()
	refused := uint64(0)
	for _, node := range n {
		refused += node.Stats().AckNoneRefused
	}
	t.Logf("outcomes %v; handled %d; AckNoneRefused %d", stats, rec.total.Load(), refused)
}
