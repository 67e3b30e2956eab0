//go:build soak

package pubsub_test

// A long chaos run for consumer groups with keys (and headers) under
// network faults and membership changes, on a 3-server routed cluster with
// one node per server (testcluster.NewFaulty). One group "g" of three
// members (one per node), one broadcast subscriber, a topic owned by n1,
// and a BatchingProducer on n2 producing keyed messages (50 keys, some
// keyless, some with headers) through the whole scenario. It found the
// mid-batch Unsubscribe bug TestUnsubscribeMidBatchIsNotReportedDelivered
// now pins.
//
//	go test -race -tags soak -run 'SoakGroup' -v .
//
// Checked after each heal or change, against the README's guarantees:
//   - an Accepted ack (AckDelivered) that lists no failure for the group
//     means the group processed the message: exactly once (at-most-once
//     topic: never more than once, whatever the ack says);
//   - an Accepted ack never counts more deliveries than happened, and a
//     Delivered count that claims the broadcast subscriber means it got it;
//   - per member and key, messages arrive in increasing produce order
//     (re-routes on SubscriberGone/MailboxFull may break this: README);
//   - every failed future carries a Reason matching its error;
//   - Message.Key and Message.Header equal what was produced;
//   - after the heal, publishing resumes: keyed messages reach the group
//     and the broadcast subscriber within a few seconds.

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

const chaosGroup = "g"

func chaosKey(i int) string {
	if i%20 == 19 {
		return "" // some keyless messages mixed in: spread round robin
	}
	k := i % 50
	if k == 49 {
		return "ключ 49/ü" // non-ASCII, space and slash
	}
	return fmt.Sprintf("cust-%02d", k)
}

// chaosOut is message i as produced; called again to know what to expect.
func chaosOut(i int) pubsub.Outgoing {
	o := pubsub.Outgoing{Data: []byte(fmt.Sprintf("m%06d", i)), Key: chaosKey(i)}
	switch i % 5 {
	case 0:
		o.Header = pubsub.Header{"idx": {strconv.Itoa(i)}, "tenant": {"acme", "beta"}}
	case 2:
		o.Header = pubsub.Header{"Trace-Id": {fmt.Sprintf("t-%d", i)}, "x": {"a b:c"}}
	}
	return o
}

type chaosMsg struct {
	idx int
	key string
}

type groupChaos struct {
	t       *testing.T
	c       *testcluster.Cluster
	topic   string
	members []*pubsub.Subscription // members[i] on c.Nodes[i]
	bcast   *pubsub.Subscription
	prod    *pubsub.BatchingProducer

	mu         sync.Mutex
	subs       map[pubsub.SubscriberID]*pubsub.Subscription
	got        map[pubsub.SubscriberID][]chaosMsg
	groupN     map[int]int // message -> deliveries to the group
	groupBy    map[int][]pubsub.SubscriberID
	bcastN     map[int]int // message -> deliveries to the broadcast subscriber
	badMeta    []string
	afterEnd   []string // handler calls that started on an ended subscription
	futures    []*pubsub.Produced
	failEvents []pubsub.DeliveryFailed // DeliveryFailed of group members, from every node
	// leaver, once a member left: the shares queued at it when it left are
	// re-routed to the next-ranked member, where they may run after later
	// batches of their keys (README), with no failure to show for it when
	// the re-route succeeds.
	leaver pubsub.SubscriberID

	work time.Duration // each group member's handler takes this long per message

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

// newGroupChaos builds the cluster and subscriptions; the broadcast
// subscriber goes on node bcastOn.
func newGroupChaos(t *testing.T, bcastOn int, opts ...pubsub.Option) *groupChaos {
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...), opts...)...)
	c.WaitConverged(t, 10*time.Second)
	p := &groupChaos{t: t, c: c, subs: map[pubsub.SubscriberID]*pubsub.Subscription{}, got: map[pubsub.SubscriberID][]chaosMsg{},
		groupN: map[int]int{}, groupBy: map[int][]pubsub.SubscriberID{}, bcastN: map[int]int{}, stop: make(chan struct{})}
	p.topic = ownedBy(t, c.Nodes[1], "chaos-groups")
	for _, n := range c.Nodes {
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if f, ok := e.(pubsub.DeliveryFailed); ok && f.Topic == p.topic && f.Group != "" {
				p.mu.Lock()
				p.failEvents = append(p.failEvents, f)
				p.mu.Unlock()
			}
		})
		t.Cleanup(cancel)
	}
	for _, n := range c.Nodes {
		s, err := n.Subscribe(ctxT(t), p.topic, p.handle, pubsub.WithGroup(chaosGroup))
		require.NoError(t, err)
		p.members = append(p.members, s)
	}
	s, err := c.Nodes[bcastOn].Subscribe(ctxT(t), p.topic, p.handle)
	require.NoError(t, err)
	p.bcast = s
	p.mu.Lock()
	for _, s := range append(append([]*pubsub.Subscription{}, p.members...), p.bcast) {
		p.subs[s.ID()] = s
	}
	p.mu.Unlock()
	prod, err := pubsub.NewBatchingProducer(c.Nodes[2], p.topic, pubsub.ProducerConfig{
		MaxInFlight:    4,
		BatchSize:      400, // keeps a member's share of a batch well within SubscriberTimeout when handlers work
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue },
	})
	require.NoError(t, err)
	p.prod = prod
	// Runs before the cluster's cleanup (LIFO).
	t.Cleanup(func() {
		p.stopProducing()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := prod.Close(ctx); err != nil {
			t.Logf("producer close: %v", err)
		}
	})
	return p
}

func (p *groupChaos) handle(ctx context.Context, m *pubsub.Message) error {
	id, ok := pubsub.SubscriberFromContext(ctx)
	if !ok {
		panic("no subscriber in ctx")
	}
	if p.work > 0 && id.Group() == chaosGroup {
		defer time.Sleep(p.work) // simulated work after recording, so mailboxes back up
	}
	var i int
	if strings.HasPrefix(string(m.Data), "fresh-") {
		var node, key int
		_, _ = fmt.Sscanf(string(m.Data), "fresh-%d-%d", &node, &key)
		if m.Key != fmt.Sprintf("cust-%02d", key) || m.Header.Get("fresh") != "yes" || len(m.Header) != 1 {
			p.mu.Lock()
			p.badMeta = append(p.badMeta, fmt.Sprintf("%s: %s key %q header %v", id, m.Data, m.Key, m.Header))
			p.mu.Unlock()
		}
		return nil
	}
	if _, err := fmt.Sscanf(string(m.Data), "m%d", &i); err != nil {
		p.mu.Lock()
		p.badMeta = append(p.badMeta, fmt.Sprintf("%s: unparsable data %q", id, m.Data))
		p.mu.Unlock()
		return nil
	}
	want := chaosOut(i)
	key := strings.Clone(m.Key)
	var meta string
	if key != want.Key {
		meta = fmt.Sprintf("%s: m%06d key %q, want %q", id, i, key, want.Key)
	} else if !reflect.DeepEqual(map[string][]string(m.Header), map[string][]string(want.Header)) {
		meta = fmt.Sprintf("%s: m%06d header %v, want %v", id, i, m.Header, want.Header)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if meta != "" {
		p.badMeta = append(p.badMeta, meta)
	}
	if s := p.subs[id]; s != nil {
		select {
		case <-s.Done():
			p.afterEnd = append(p.afterEnd, fmt.Sprintf("%s got m%06d after it ended (err %v)", id, i, s.Err()))
		default:
		}
	}
	p.got[id] = append(p.got[id], chaosMsg{idx: i, key: key})
	if id.Group() == chaosGroup {
		p.groupN[i]++
		p.groupBy[i] = append(p.groupBy[i], id)
	} else {
		p.bcastN[i]++
	}
	return nil
}

// start produces message after message on the producer until stopProducing.
func (p *groupChaos) start() {
	p.wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			default:
			}
			f := p.prod.ProduceMessage(context.Background(), chaosOut(i))
			p.mu.Lock()
			p.futures = append(p.futures, f)
			p.mu.Unlock()
			if i%10 == 9 {
				time.Sleep(3 * time.Millisecond) // pacing the load, not synchronisation
			}
		}
	})
}

func (p *groupChaos) stopProducing() {
	p.stopOnce.Do(func() { close(p.stop) })
	p.wg.Wait()
}

func (p *groupChaos) produced() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.futures)
}

// acceptedFrom counts futures from index from that completed Accepted with
// both the group and the broadcast subscriber delivered and no failure.
func (p *groupChaos) cleanRunFrom(from int) (int, bool) {
	p.mu.Lock()
	fs := p.futures[min(from, len(p.futures)):]
	p.mu.Unlock()
	run := 0
	for _, f := range fs {
		ack, err, done := f.Result()
		if !done {
			break
		}
		if err == nil && ack.Delivered == 2 && len(ack.Failures) == 0 {
			run++
		} else {
			run = 0
		}
	}
	return run, run >= 100
}

// lastOutcome describes the last completed future that was not clean.
func (p *groupChaos) lastOutcome() string {
	p.mu.Lock()
	fs := append([]*pubsub.Produced(nil), p.futures...)
	p.mu.Unlock()
	desc := "none"
	for i, f := range fs {
		ack, err, done := f.Result()
		if !done {
			return fmt.Sprintf("%d of %d futures done; last unclean: %s", i, len(fs), desc)
		}
		if err != nil || ack.Delivered != 2 || len(ack.Failures) > 0 {
			desc = fmt.Sprintf("m%06d ack %+v err %v", i, ack, err)
		}
	}
	return fmt.Sprintf("all %d futures done; last unclean: %s", len(fs), desc)
}

// waitAllDone waits until every future produced before index upto has
// completed.
func (p *groupChaos) waitAllDone(upto int, within time.Duration) {
	p.mu.Lock()
	fs := append([]*pubsub.Produced(nil), p.futures[:min(upto, len(p.futures))]...)
	p.mu.Unlock()
	testcluster.WaitFor(p.t, within, func() bool {
		for _, f := range fs {
			if _, _, done := f.Result(); !done {
				return false
			}
		}
		return true
	}, "%d futures not complete within %v", len(fs), within)
}

// check verifies every completed future against what the subscribers got.
func (p *groupChaos) check(phase string) {
	t := p.t
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	reasons := map[pubsub.Reason]int{}
	var accepted, groupFailed, bcastFailed int
	failStatus := map[string]int{}
	failedButGot := map[string]int{} // ack failures -> messages the group got anyway
	errs := map[string][]string{}    // by kind (the format)
	var kinds []string
	report := func(format string, args ...any) {
		if _, ok := errs[format]; !ok {
			kinds = append(kinds, format)
		}
		errs[format] = append(errs[format], fmt.Sprintf(format, args...))
	}
	for i, f := range p.futures {
		ack, err, done := f.Result()
		if !done {
			continue
		}
		if p.groupN[i] > 1 {
			report("m%06d reached the group %d times (at-most-once topic); ack %+v err %v", i, p.groupN[i], ack, err)
		}
		if p.bcastN[i] > 1 {
			report("m%06d reached the broadcast subscriber %d times; ack %+v err %v", i, p.bcastN[i], ack, err)
		}
		if err != nil {
			reasons[ack.Reason]++
			if ack.Status != pubsub.Rejected || ack.Reason == pubsub.ReasonNone || !errors.Is(err, ack.Reason.Err()) {
				report("m%06d failed without a matching reason: ack %+v err %v", i, ack, err)
			}
			continue
		}
		accepted++
		if ack.Status != pubsub.Accepted || ack.Level != pubsub.AckDelivered {
			report("m%06d: nil error with ack %+v", i, ack)
		}
		gFail, bFail := false, false
		for _, fl := range ack.Failures {
			failStatus[fmt.Sprintf("%s/%s", fl.Group, fl.Status)]++
			if fl.Group == chaosGroup {
				gFail = true
			}
			if fl.Subscriber == p.bcast.ID() {
				bFail = true
			}
		}
		if gFail {
			groupFailed++
			for _, fl := range ack.Failures {
				if fl.Group == chaosGroup && slices.Contains(p.groupBy[i], fl.Subscriber) {
					// The member the ack says failed processed the message.
					failedButGot[fl.Status.String()]++
				}
			}
		}
		if bFail {
			bcastFailed++
		}
		actual := min(p.groupN[i], 1) + min(p.bcastN[i], 1)
		if ack.Delivered > actual {
			report("m%06d: ack claims %d deliveries, %d happened (group %d, broadcast %d): %+v", i, ack.Delivered, actual, p.groupN[i], p.bcastN[i], ack)
		}
		if !gFail && p.groupN[i] == 0 {
			report("m%06d: accepted ack lists no group failure but the group never got it: %+v", i, ack)
		}
		// What Delivered claims for the broadcast subscriber: the group
		// counts once when not failed.
		claimedBcast := ack.Delivered - btoi(!gFail)
		if claimedBcast >= 1 && p.bcastN[i] == 0 {
			report("m%06d: ack Delivered %d claims the broadcast subscriber, which never got it: %+v", i, ack.Delivered, ack)
		}
	}
	// Per member and key: increasing produce order.
	reroutable := 0
	for _, e := range p.failEvents {
		if e.Status == pubsub.SubscriberGone || e.Status == pubsub.MailboxFull {
			reroutable++
		}
	}
	var inversions, movedFromLeaver []string
	leaverKeys := map[string]bool{}
	for _, r := range p.got[p.leaver] {
		leaverKeys[r.key] = true
	}
	multiOwner := 0
	keyMembers := map[string]map[pubsub.SubscriberID]bool{}
	for _, m := range p.members {
		last := map[string]int{}
		for _, r := range p.got[m.ID()] {
			if r.key == "" {
				continue
			}
			if keyMembers[r.key] == nil {
				keyMembers[r.key] = map[pubsub.SubscriberID]bool{}
			}
			keyMembers[r.key][m.ID()] = true
			if prev, ok := last[r.key]; ok && r.idx <= prev {
				inv := fmt.Sprintf("%s key %q: m%06d after m%06d", m.ID(), r.key, r.idx, prev)
				if p.leaver != (pubsub.SubscriberID{}) && leaverKeys[r.key] {
					movedFromLeaver = append(movedFromLeaver, inv)
				} else {
					inversions = append(inversions, inv)
				}
			}
			last[r.key] = max(last[r.key], r.idx)
		}
	}
	for _, ms := range keyMembers {
		if len(ms) > 1 {
			multiOwner++
		}
	}
	// Broadcast subscriber: increasing produce order overall.
	bl := -1
	for _, r := range p.got[p.bcast.ID()] {
		if r.idx <= bl {
			report("broadcast %s: m%06d after m%06d: producer order broken", p.bcast.ID(), r.idx, bl)
		}
		bl = max(bl, r.idx)
	}
	statuses := map[string]int{}
	for _, e := range p.failEvents {
		statuses[e.Subscriber.String()+" "+e.Status.String()]++
	}
	t.Logf("[%s] produced %d, accepted %d (group failure listed in %d, broadcast failure in %d), rejected by reason %v; ack failures %v",
		phase, len(p.futures), accepted, groupFailed, bcastFailed, reasons, failStatus)
	t.Logf("[%s] DeliveryFailed events for group members: %v; keys seen on >1 member: %d; per-key inversions: %d", phase, statuses, multiOwner, len(inversions))
	if len(failedButGot) > 0 {
		t.Logf("[%s] messages processed by the very member their ack lists as failed, by status: %v", phase, failedButGot)
	}
	if len(movedFromLeaver) > 0 {
		t.Logf("[%s] %d per-key inversions of keys the member that left had handled (its queued shares re-routed): %v", phase, len(movedFromLeaver), movedFromLeaver[:min(5, len(movedFromLeaver))])
	}
	if len(inversions) > 0 {
		shown := inversions[:min(5, len(inversions))]
		if reroutable > 0 {
			t.Logf("[%s] per-key inversions with %d re-routable failures (README: a re-routed share may be handled after later batches): %v", phase, reroutable, shown)
		} else {
			report("per-key order broken at a member with no re-routable failure (%d inversions): %v", len(inversions), shown)
		}
	}
	for _, m := range p.badMeta[:min(5, len(p.badMeta))] {
		report("key/header mismatch: %s", m)
	}
	if len(p.badMeta) > 0 {
		report("%d key/header mismatches in all", len(p.badMeta))
	}
	for _, k := range kinds {
		for _, e := range errs[k][:min(3, len(errs[k]))] {
			t.Errorf("[%s] %s", phase, e)
		}
		if len(errs[k]) > 3 {
			t.Errorf("[%s] ... %d violations of this kind in all", phase, len(errs[k]))
		}
	}
	if len(errs) > 0 {
		p.explainMissing()
	}
}

// explainMissing logs, for messages an ack counted as delivered to the
// group that no member got, their keys and which members got each key's
// other messages.
func (p *groupChaos) explainMissing() {
	t := p.t
	byKey := map[string][]int{}
	var missing []int
	for i, f := range p.futures {
		ack, err, done := f.Result()
		if !done || err != nil || p.groupN[i] > 0 {
			continue
		}
		gFail := false
		for _, fl := range ack.Failures {
			gFail = gFail || fl.Group == chaosGroup
		}
		if !gFail {
			missing = append(missing, i)
			byKey[chaosKey(i)] = append(byKey[chaosKey(i)], i)
		}
	}
	if len(missing) == 0 {
		return
	}
	t.Logf("%d messages counted delivered to the group but never handled, m%06d..m%06d, keys %d", len(missing), missing[0], missing[len(missing)-1], len(byKey))
	shown := 0
	for key, idx := range byKey {
		if shown == 4 {
			break
		}
		shown++
		// Who got this key's messages just before and after?
		var around []string
		for _, m := range p.members {
			var got []int
			for _, r := range p.got[m.ID()] {
				if r.key == key && r.idx >= idx[0]-200 && r.idx <= idx[len(idx)-1]+200 {
					got = append(got, r.idx)
				}
			}
			around = append(around, fmt.Sprintf("%s:%v", m.ID(), got))
		}
		t.Logf("  key %q missing %v; around them %v", key, idx, around)
	}
	if len(byKey[""]) > 0 {
		t.Logf("  keyless missing: %v", byKey[""])
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// waitResumed waits until, from message index from on, 100 consecutive
// futures come back Accepted with the group and the broadcast subscriber
// delivered; then a direct keyed publish of one message per key from
// every node reaches both.
func (p *groupChaos) waitResumed(from int, healed time.Time, within time.Duration) {
	t := p.t
	t.Helper()
	testcluster.WaitFor(t, within, func() bool { _, ok := p.cleanRunFrom(from); return ok },
		"producer publishes not delivered to the group and the broadcast subscriber %v after the heal", within)
	t.Logf("producer's publishes delivered cleanly again %v after the heal", time.Since(healed).Round(time.Millisecond))
	for k, n := range p.c.Nodes {
		var out []pubsub.Outgoing
		for key := range 50 {
			out = append(out, pubsub.Outgoing{Data: []byte(fmt.Sprintf("fresh-%d-%d", k, key)), Key: fmt.Sprintf("cust-%02d", key),
				Header: pubsub.Header{"fresh": {"yes"}}})
		}
		var ack pubsub.PublishAck
		var err error
		testcluster.WaitFor(t, within, func() bool {
			ack, err = n.PublishMessages(ctxT(t), p.topic, out)
			return err == nil && ack.Delivered == 2 && len(ack.Failures) == 0
		}, "fresh keyed publish from %s not delivered: ack %+v err %v", n.ID(), ack, err)
	}
	t.Logf("fresh keyed publishes from every node delivered %v after the heal", time.Since(healed).Round(time.Millisecond))
}

// faultStep is one fault: inject it, wait until effect holds (a view lost
// a member), hold it until the publisher has seen it, heal, check.
type faultStep struct {
	what   string
	inject func(c *testcluster.Cluster)
	effect func(c *testcluster.Cluster) bool
}

func stallStep(from, to int) faultStep {
	return faultStep{fmt.Sprintf("stall n%d->n%d", from, to), func(c *testcluster.Cluster) { c.StallRoute(from, to) },
		func(c *testcluster.Cluster) bool { return !hasMember(c.Nodes[to], fmt.Sprint("n", from)) }}
}

func cutStep(i, j int) faultStep {
	return faultStep{fmt.Sprintf("cut %d-%d", i, j), func(c *testcluster.Cluster) { c.Route(i, j).Cut() },
		func(c *testcluster.Cluster) bool {
			return !hasMember(c.Nodes[i], fmt.Sprint("n", j)) && !hasMember(c.Nodes[j], fmt.Sprint("n", i))
		}}
}

func stallBothStep(i, j int) faultStep {
	return faultStep{fmt.Sprintf("stall both %d-%d", i, j), func(c *testcluster.Cluster) { c.Route(i, j).Stall(faultnet.Both) },
		func(c *testcluster.Cluster) bool {
			return !hasMember(c.Nodes[i], fmt.Sprint("n", j)) && !hasMember(c.Nodes[j], fmt.Sprint("n", i))
		}}
}

// dirtyBatches counts the distinct batches (acks) from index from on that
// completed with an error or with failures listed.
func (p *groupChaos) dirtyBatches(from int) int {
	p.mu.Lock()
	fs := p.futures[min(from, len(p.futures)):]
	p.mu.Unlock()
	n := 0
	var last *pubsub.DeliveryFailure
	var lastErr error
	for _, f := range fs {
		ack, err, done := f.Result()
		if !done {
			break
		}
		switch {
		case err != nil:
			if err != lastErr {
				n++
			}
			lastErr = err
		case len(ack.Failures) > 0:
			if &ack.Failures[0] != last { // a batch's futures share Failures
				n++
			}
			last = &ack.Failures[0]
		}
	}
	return n
}

func runGroupFault(t *testing.T, bcastOn int, steps ...faultStep) {
	p := newGroupChaos(t, bcastOn)
	c := p.c
	p.start()
	testcluster.WaitFor(t, 5*time.Second, func() bool { n, _ := p.cleanRunFrom(0); return n >= 300 },
		"no clean progress before the fault")
	p.check("before the fault")
	for _, st := range steps {
		st.inject(c)
		faulted := time.Now()
		atFault := p.produced()
		testcluster.WaitFor(t, 3*faultMemberTimeout, func() bool { return st.effect(c) }, "fault had no effect: %s", st.what)
		t.Logf("[%s] took effect after %v", st.what, time.Since(faulted).Round(time.Millisecond))
		// Hold the fault until the publisher has seen it in 3 batches (a
		// failed future or an ack listing a failure), at most 6 s more.
		if embedded.Poll(8*time.Second, func() bool { return p.dirtyBatches(atFault) >= chaosHold }) {
			t.Logf("[%s] seen by the publisher in %d batches after %v", st.what, chaosHold, time.Since(faulted).Round(time.Millisecond))
		} else {
			t.Logf("[%s] seen by the publisher in %d batches within %v", st.what, p.dirtyBatches(atFault), time.Since(faulted).Round(time.Millisecond))
		}
		c.HealAll()
		healed := time.Now()
		atHeal := p.produced()
		t.Logf("[%s] messages produced during the fault: %d", st.what, atHeal-atFault)
		c.WaitMeshed(t, 5*time.Second)
		p.waitResumed(atHeal, healed, 2*faultMemberTimeout+time.Second)
		c.WaitConverged(t, 5*time.Second)
		p.waitAllDone(atHeal, 10*time.Second)
		p.check("after the heal of " + st.what)
	}
	p.stopProducing()
	p.waitAllDone(1<<30, 10*time.Second)
	p.check("end")
	for _, s := range append(append([]*pubsub.Subscription{}, p.members...), p.bcast) {
		select {
		case <-s.Done():
			t.Errorf("%s ended by the fault: %v", s.ID(), s.Err())
		default:
		}
	}
	p.mu.Lock()
	for _, a := range p.afterEnd[:min(5, len(p.afterEnd))] {
		t.Errorf("%s", a)
	}
	p.mu.Unlock()
}

func TestSoakGroupFaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []faultStep
	}{
		// The owner's deliveries to n0 (a member and the broadcast
		// subscriber) are held; n0 stops hearing n1.
		{"stall n1->n0", []faultStep{stallStep(1, 0)}},
		// n0's answers to the owner are held; the owner drops n0's
		// subscribers.
		{"stall n0->n1", []faultStep{stallStep(0, 1)}},
		// The producer's requests to the owner are held.
		{"stall n2->n1", []faultStep{stallStep(2, 1)}},
		{"cut 0-1", []faultStep{cutStep(0, 1)}},
		// Producer and owner cut apart; n0 still sees both.
		{"cut 1-2", []faultStep{cutStep(1, 2)}},
		{"stall both 0-1", []faultStep{stallBothStep(0, 1)}},
		// One cluster, one fault after the other.
		{"stall n1->n0 then cut 1-2", []faultStep{stallStep(1, 0), cutStep(1, 2)}},
	} {
		t.Run(tc.name, func(t *testing.T) { runGroupFault(t, 0, tc.steps...) })
	}
}

// A member unsubscribes mid-stream, or its node closes gracefully.
func TestSoakGroupMemberLeaves(t *testing.T) {
	t.Run("unsubscribe n0's member", func(t *testing.T) { runGroupMemberLeaves(t, 0, false, 2) })
	t.Run("close n0", func(t *testing.T) { runGroupMemberLeaves(t, 0, true, 2) })
	t.Run("close n1 (the owner)", func(t *testing.T) { runGroupMemberLeaves(t, 1, true, 0) })
}

func runGroupMemberLeaves(t *testing.T, who int, closeNode bool, bcastOn int) {
	p := newGroupChaos(t, bcastOn)
	p.work = chaosWork
	c := p.c
	p.start()
	testcluster.WaitFor(t, 10*time.Second, func() bool { n, _ := p.cleanRunFrom(0); return n >= 1500 },
		"no clean progress before the change")
	at := p.produced()
	changed := time.Now()
	if closeNode {
		c.CloseNode(t, who)
		require.ErrorIs(t, p.members[who].Err(), pubsub.ErrClosed)
	} else {
		require.NoError(t, p.members[who].Unsubscribe(ctxT(t)))
	}
	p.mu.Lock()
	p.leaver = p.members[who].ID()
	p.mu.Unlock()
	t.Logf("%s's member left after %d messages, in %v", c.Nodes[who].ID(), at, time.Since(changed).Round(time.Millisecond))
	after := p.produced()
	testcluster.WaitFor(t, 10*time.Second, func() bool { n, _ := p.cleanRunFrom(after); return n >= 1000 },
		"publishes not delivered cleanly after the change: %s", p.lastOutcome())
	end := p.produced()
	p.stopProducing()
	p.waitAllDone(1<<30, 10*time.Second)
	p.check("after the change")

	p.mu.Lock()
	defer p.mu.Unlock()
	// README: a graceful leave is answered and retried with the new owner;
	// publishers see no failures.
	failed := 0
	for i, f := range p.futures {
		if _, err, _ := f.Result(); err != nil {
			failed++
			if failed <= 3 {
				t.Errorf("m%06d failed across a graceful change: %v", i, err)
			}
		}
	}
	// README: after a member leaves, nothing accepted after the owner saw
	// the change is lost or duplicated within the group. Messages produced
	// once the change returned and the stream ran clean again:
	from := end // a Close: the owner sees the LEAVE some time after Close returned
	if !closeNode {
		from = after // Unsubscribe returns once the owner acknowledged it
	}
	lost := 0
	for i := from; i < len(p.futures); i++ {
		if ack, err, _ := p.futures[i].Result(); err == nil && p.groupN[i] != 1 {
			lost++
			if lost <= 3 {
				t.Errorf("m%06d, produced after the change, reached the group %d times: %+v", i, p.groupN[i], ack)
			}
		}
	}
	left := p.members[who].ID()
	var late []string
	for _, r := range p.got[left] {
		if r.idx >= after {
			late = append(late, fmt.Sprintf("m%06d", r.idx))
		}
	}
	assert.Empty(t, late, "the member that left got messages produced after it left")
	// Unsubscribe's doc: a batch being handled when it ends "stops after
	// the current message": the run loop checks the subscription right
	// before each call, so one call whose check came just before the end may
	// still start after it (the handler sees Done closed; 1 of 15 runs),
	// never a second. Close only promises to wait for running handlers: a
	// share being handled may finish, so logged.
	report := t.Errorf
	if closeNode || len(p.afterEnd) <= 1 {
		report = t.Logf
	}
	for _, a := range p.afterEnd[:min(3, len(p.afterEnd))] {
		report("handler call after the subscription ended: %s", a)
	}
	if len(p.afterEnd) > 0 {
		report("%d handler calls after the subscription ended", len(p.afterEnd))
	}
	counts := map[string]int{}
	for id, msgs := range p.got {
		counts[id.String()] = len(msgs)
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("  %s got %d", k, counts[k])
	}
}

// chaosHold is how many batches must show a fault (failed or with failures
// listed) before it is healed.
var chaosHold = 8

// chaosWork is how long a group member's handler works per message in the
// leave scenarios.
var chaosWork = 300 * time.Microsecond
