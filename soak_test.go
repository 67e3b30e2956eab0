//go:build soak

package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
)

// TestSoakChurn publishes from several nodes while nodes join, crash and
// leave, and checks that every accepted message reached every subscriber that
// lived through the whole run, or that its ack said it did not, and that
// each publisher's accepted messages arrived in order. Run it with
//
//	go test -race -tags soak -run Soak -timeout 20m .      (PUBSUB_SOAK=2m for longer)
func TestSoakChurn(t *testing.T) {
	duration := 45 * time.Second
	if d, err := time.ParseDuration(os.Getenv("PUBSUB_SOAK")); err == nil {
		duration = d
	}
	const topics = 8
	// The even soak topics are at-least-once, the odd ones (and the
	// pipelined producer's) at-most-once. Every node, the churning ones
	// too, gets the same mode function: any of them may own a topic.
	atLeastOnceTopic := map[string]bool{}
	for i := 0; i < topics; i += 2 {
		atLeastOnceTopic[fmt.Sprintf("soak-%d", i)] = true
	}
	modeOpt := pubsub.WithDeliveryMode(func(topic string) pubsub.DeliveryMode {
		if atLeastOnceTopic[topic] {
			return pubsub.AtLeastOnce
		}
		return pubsub.AtMostOnce
	})
	churnOpts := append(append([]pubsub.Option{}, fast...), modeOpt)
	c := newCluster(t, 3, 4, modeOpt)
	rec := newRecorder()
	// Every soak topic also has a consumer group "g": one member on each of
	// nodes 0 to 3 and one on each churning node, beside its broadcast
	// subscriber. The group's deliveries go to their own inbox; hits keeps
	// each message's deliveries to the group with the member and the time.
	const group = "g"
	groupIn := newGroupInbox()
	var hitsMu sync.Mutex
	hits := map[string][]soakGroupHit{}
	groupHandler := func(ctx context.Context, m *pubsub.Message) error {
		id, _ := pubsub.SubscriberFromContext(ctx)
		hitsMu.Lock()
		hits[string(m.Data)] = append(hits[string(m.Data)], soakGroupHit{id, time.Now()})
		hitsMu.Unlock()
		return groupIn.handler(ctx, m)
	}
	var groupMembers []pubsub.SubscriberID
	// Every broadcast subscriber of the soak topics (stable or not), by
	// topic: they tell how many of an ack's Delivered are not the group.
	broadcastOf := map[string][]pubsub.SubscriberID{}
	// Nodes 0 and 1 stay up and hold the subscribers that are checked.
	var stable []pubsub.SubscriberID
	topicOf := map[pubsub.SubscriberID]string{}
	for i := 0; i < topics; i++ {
		topic := fmt.Sprintf("soak-%d", i)
		for _, n := range c.Nodes[:2] {
			id := subscribe(t, n, topic, rec.handler).ID()
			stable = append(stable, id)
			topicOf[id] = topic
			broadcastOf[topic] = append(broadcastOf[topic], id)
		}
		broadcastOf[topic] = append(broadcastOf[topic], subscribe(t, c.Nodes[2], topic, rec.handler).ID())
		broadcastOf[topic] = append(broadcastOf[topic], subscribe(t, c.Nodes[3], topic, rec.handler).ID())
		for _, s := range subscribeGroup(t, c.Nodes[:4], topic, group, groupHandler) {
			groupMembers = append(groupMembers, s.ID())
		}
	}
	type sent = soakSent
	var mu sync.Mutex
	var accepted []sent
	rejected := map[pubsub.Reason]int{}
	rejectedData := map[string]pubsub.Reason{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w, n := range c.Nodes[:2] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				topic := fmt.Sprintf("soak-%d", i%topics)
				data := fmt.Sprintf("p%d-%07d", w, i)
				start := time.Now()
				ack, err := n.Publish(context.Background(), topic, []byte(data))
				end := time.Now()
				mu.Lock()
				if err != nil {
					if !errors.Is(err, ack.Reason.Err()) {
						t.Errorf("error %v does not match reason %s", err, ack.Reason)
					}
					rejected[ack.Reason]++
					rejectedData[data] = ack.Reason
				} else {
					accepted = append(accepted, sent{topic, data, ack, start, end})
				}
				mu.Unlock()
			}
		}()
	}
	// A pipelined producer on a stable node: its messages must keep their
	// order at every stable subscriber of its topic.
	pipeRec := newRecorder()
	var pipeSubs []*pubsub.Subscription
	for _, n := range c.Nodes[:2] {
		pipeSubs = append(pipeSubs, subscribe(t, n, "soak-pipelined", pipeRec.handler))
	}
	producer, err := pubsub.NewBatchingProducer(c.Nodes[0], "soak-pipelined", pubsub.ProducerConfig{
		MaxInFlight: 4, BatchSize: 50, Linger: time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue },
	})
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f := producer.Produce(context.Background(), []byte(fmt.Sprintf("q-%07d", i)))
			if i%200 == 199 {
				_, _ = f.Wait(context.Background()) // keep the queue short
			}
		}
	}()
	deadline := time.Now().Add(duration)
	r := rand.New(rand.NewPCG(1, 2))
	churn := 0
	departed := map[string]string{} // churning node -> how and when it went
	for time.Now().Before(deadline) {
		// Add a node, then take one of the added ones away, by crash or close.
		n := c.AddNode(t, fmt.Sprintf("churn%d", churn), churn%3, churnOpts...)
		idx := len(c.Nodes) - 1
		topic := fmt.Sprintf("soak-%d", churn%topics)
		broadcastOf[topic] = append(broadcastOf[topic], subscribe(t, n, topic, rec.handler).ID())
		member := subscribeGroup(t, []*pubsub.Node{n}, topic, group, groupHandler)[0].ID()
		groupMembers = append(groupMembers, member)
		c.WaitConverged(t, 10*time.Second)
		// Let the new member take part in the group (up to 2 s) before its
		// node goes: without that it rarely gets a share at all.
		for wait := time.Now().Add(2 * time.Second); len(groupIn.of(member)) == 0 && time.Now().Before(wait); {
			time.Sleep(20 * time.Millisecond)
		}
		if r.IntN(2) == 0 {
			departed[n.ID()] = "crashed at " + time.Now().Format("15:04:05.000")
			c.Crash(idx)
		} else {
			departed[n.ID()] = "closed at " + time.Now().Format("15:04:05.000")
			c.CloseNode(t, idx)
		}
		c.WaitConverged(t, 10*time.Second)
		churn++
	}
	close(stop)
	wg.Wait()

	if err := producer.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, s := range pipeSubs {
		msgs := pipeRec.of(s.ID())
		reordered := 0
		for i := 1; i < len(msgs); i++ {
			if msgs[i] <= msgs[i-1] {
				reordered++
			}
		}
		t.Logf("pipelined producer: %s got %d messages, %d out of order", s.ID(), len(msgs), reordered)
		if reordered > 0 {
			t.Errorf("pipelined producer's messages out of order at %s", s.ID())
		}
	}
	got := map[pubsub.SubscriberID]map[string]int{}
	for _, id := range stable {
		got[id] = map[string]int{}
		last := map[byte]string{}
		for i, d := range rec.of(id) {
			got[id][d] = i
			if prev, ok := last[d[1]]; ok && prev > d {
				t.Errorf("%s received %s after %s: out of order", id, d, prev)
			}
			last[d[1]] = d
		}
	}
	missing := 0
	for _, s := range accepted {
		for _, id := range stable {
			if topicOf[id] != s.topic {
				continue
			}
			if _, ok := got[id][s.data]; ok {
				continue
			}
			if _, reported := failureOf(s.ack, id); !reported {
				missing++
				if missing < 10 {
					t.Errorf("%s accepted (%+v) but %s neither got it nor was reported", s.data, s.ack, id)
				}
			}
		}
	}
	t.Logf("%d churn rounds; %d publishes accepted, rejected by reason %v; %d silently missing", churn, len(accepted), rejected, missing)
	hitsMu.Lock()
	defer hitsMu.Unlock()
	checkSoakGroup(t, soakGroupRun{
		group: group, atLeastOnce: atLeastOnceTopic, rec: rec, groupIn: groupIn, hits: hits,
		members: groupMembers, broadcastOf: broadcastOf, departed: departed,
		accepted: accepted, rejected: rejectedData,
	})
}

// soakSent is one accepted publish of TestSoakChurn.
type soakSent struct {
	topic, data string
	ack         pubsub.PublishAck
	start, end  time.Time // the Publish call
}

// soakGroupHit is one delivery of a message to a member of the soak group.
type soakGroupHit struct {
	member pubsub.SubscriberID
	at     time.Time
}

// soakGroupRun is what TestSoakChurn's consumer group check needs.
type soakGroupRun struct {
	group       string
	atLeastOnce map[string]bool // topic -> AtLeastOnce (else AtMostOnce)
	rec         *recorder       // the broadcast subscribers' deliveries
	groupIn     *groupInbox     // the group members' deliveries
	hits        map[string][]soakGroupHit
	members     []pubsub.SubscriberID            // every member the group ever had
	broadcastOf map[string][]pubsub.SubscriberID // topic -> every broadcast subscriber it ever had
	departed    map[string]string                // churning node -> how and when it went
	accepted    []soakSent
	rejected    map[string]pubsub.Reason
}

// checkSoakGroup checks the consumer group of TestSoakChurn: no message
// reached the group twice, but on an at-least-once topic after a member
// that ran it crashed (its share is re-routed: "may have run it first");
// on an at-least-once topic every accepted message reached it exactly once
// unless its ack reports a failure of the group (then at most once); on an
// at-most-once topic a message the group missed must be explained by its
// ack: a failure of the group listed, or Delivered not counting the group.
func checkSoakGroup(t *testing.T, r soakGroupRun) {
	t.Helper()
	modeOf := func(topic string) string {
		if r.atLeastOnce[topic] {
			return "at-least-once"
		}
		return "at-most-once"
	}
	where := func(h soakGroupHit) string {
		s := fmt.Sprintf("%s at %s", h.member, h.at.Format("15:04:05.000"))
		if d, ok := r.departed[h.member.Node]; ok {
			s += " (its node " + d + ")"
		}
		return s
	}
	groupFailures := func(ack pubsub.PublishAck) (n int) {
		for _, f := range ack.Failures {
			if f.Group == r.group {
				n++
			}
		}
		return n
	}
	describe := func(s soakSent) string {
		return fmt.Sprintf("%s topic %s, published %s-%s, ack %+v", modeOf(s.topic), s.topic,
			s.start.Format("15:04:05.000"), s.end.Format("15:04:05.000"), s.ack)
	}
	acceptedBy := make(map[string]soakSent, len(r.accepted))
	for _, s := range r.accepted {
		acceptedBy[s.data] = s
	}
	// reroutedAfterACrash: an accepted message of an at-least-once topic
	// whose every run but the last was by a member whose node crashed.
	reroutedAfterACrash := func(d string) bool {
		s, ok := acceptedBy[d]
		hs := r.hits[d]
		if !ok || !r.atLeastOnce[s.topic] || len(hs) < 2 {
			return false
		}
		for _, h := range hs[:len(hs)-1] {
			if !strings.HasPrefix(r.departed[h.member.Node], "crashed") {
				return false
			}
		}
		return true
	}

	// No message ever reaches the group twice, accepted or not.
	twice := 0
	for _, d := range slices.Sorted(maps.Keys(r.hits)) {
		hs := r.hits[d]
		if len(hs) < 2 || reroutedAfterACrash(d) {
			continue
		}
		if twice++; twice > 10 {
			continue
		}
		var at []string
		for _, h := range hs {
			at = append(at, where(h))
		}
		if s, ok := acceptedBy[d]; ok {
			t.Errorf("%s reached group %q %d times: %s; %s", d, r.group, len(hs), strings.Join(at, ", "), describe(s))
		} else if reason, ok := r.rejected[d]; ok {
			t.Errorf("%s (rejected: %s) reached group %q %d times: %s", d, reason, r.group, len(hs), strings.Join(at, ", "))
		} else {
			t.Errorf("%s (never published?) reached group %q %d times: %s", d, r.group, len(hs), strings.Join(at, ", "))
		}
	}

	// What the broadcast subscribers got tells how many of an ack's
	// Delivered they are: every subscriber the owner knew at acceptance
	// either processed the message or is listed in the failures, so those
	// known are the ones that got it or are listed, and the group counts in
	// Delivered if what is left is 1.
	got := map[pubsub.SubscriberID]map[string]bool{}
	for _, ids := range r.broadcastOf {
		for _, id := range ids {
			got[id] = map[string]bool{}
			for _, d := range r.rec.of(id) {
				got[id][d] = true
			}
		}
	}
	groupCounted := func(s soakSent) int {
		failed := map[pubsub.SubscriberID]bool{}
		for _, f := range s.ack.Failures {
			if f.Group == "" {
				failed[f.Subscriber] = true
			}
		}
		known := 0
		for _, id := range r.broadcastOf[s.topic] {
			if got[id][s.data] || failed[id] {
				known++
			}
		}
		return s.ack.Delivered - (known - len(failed))
	}

	type tally struct{ accepted, once, twice, afterCrash, missReported, missUnreported, ackOdd int }
	tallies := map[string]*tally{"at-least-once": {}, "at-most-once": {}}
	bad, odd := 0, 0
	for _, s := range r.accepted {
		tl := tallies[modeOf(s.topic)]
		tl.accepted++
		n, failures, counted := len(r.hits[s.data]), groupFailures(s.ack), groupCounted(s)
		// The ack's own consistency: the group counts once in Delivered
		// exactly when no failure of it is listed.
		if (counted == 1) == (failures > 0) || counted < 0 || counted > 1 {
			tl.ackOdd++
			if odd++; odd <= 5 {
				t.Logf("ack of %s inconsistent: %d failures of group %q listed, Delivered %d counts the group %d times (the group got it %d times); %s",
					s.data, failures, r.group, s.ack.Delivered, counted, n, describe(s))
			}
		}
		switch {
		case n == 1:
			tl.once++
		case reroutedAfterACrash(s.data):
			tl.afterCrash++
		case n > 1:
			tl.twice++ // reported above
		case failures > 0:
			tl.missReported++
		default:
			tl.missUnreported++
			var why string
			switch {
			case r.atLeastOnce[s.topic]:
				why = "at least once, the group must get it unless its ack reports a failure of the group"
			case counted == 1:
				why = "the ack lists no failure of the group and its Delivered counts the group"
			case counted != 0:
				why = fmt.Sprintf("the ack lists no failure of the group and its Delivered cannot be explained (counts the group %d times)", counted)
			}
			if why != "" {
				if bad++; bad <= 10 {
					t.Errorf("%s accepted but group %q never got it: %s; %s", s.data, r.group, why, describe(s))
				}
			} else if tl.missUnreported <= 5 {
				t.Logf("%s accepted, group %q never got it; its ack does not count the group: %s", s.data, r.group, describe(s))
			}
		}
	}
	stableShare, churnShare := 0, 0
	for _, id := range r.members {
		if _, ok := r.departed[id.Node]; ok {
			churnShare += len(r.groupIn.of(id))
		} else {
			stableShare += len(r.groupIn.of(id))
		}
	}
	for _, m := range []string{"at-least-once", "at-most-once"} {
		tl := tallies[m]
		t.Logf("group %q, %s topics: %d accepted; got once %d, twice or more %d (and %d again after a member that ran it crashed); missed with the group's failure reported %d, missed without %d; %d acks inconsistent",
			r.group, m, tl.accepted, tl.once, tl.twice, tl.afterCrash, tl.missReported, tl.missUnreported, tl.ackOdd)
	}
	t.Logf("group %q: %d deliveries in all, %d to members on nodes 0-3, %d to members on churning nodes; %d messages reached it twice or more",
		r.group, r.groupIn.total(), stableShare, churnShare, twice)
}

// TestSoakFaults runs the fault tests' workload (every node publishing
// sequentially to topics owned by every node, subscribers everywhere) through
// random network faults on a proxied 3-server cluster: one-way and two-way
// route stalls, route cuts and node connection cuts of 1 to 4 s. After each
// heal every topic must serve every live subscription within
// 2 x MemberTimeout (+2 s on a loaded machine); at the end no ack may claim
// more deliveries than happened and every publisher's order must hold.
//
//	go test -race -tags soak -run SoakFaults -timeout 20m .   (PUBSUB_SOAK=2m for longer)
func TestSoakFaults(t *testing.T) {
	duration := 45 * time.Second
	if d, err := time.ParseDuration(os.Getenv("PUBSUB_SOAK")); err == nil {
		duration = d
	}
	c := newFaultyCluster(t)
	l := newFaultLoad(t, c)
	l.start()
	r := rand.New(rand.NewPCG(3, 4))
	faults := []struct {
		name   string
		inject func(a, b int)
	}{
		{"route stalled one way", func(a, b int) { c.StallRoute(a, b) }},
		{"route stalled both ways", func(a, b int) { c.Route(a, b).Stall(faultnet.Both) }},
		{"route cut", func(a, b int) { c.Route(a, b).Cut() }},
		{"client cut", func(a, _ int) { c.Client(a).Cut() }},
	}
	rounds := 0
	for deadline := time.Now().Add(duration); time.Now().Before(deadline); rounds++ {
		f := faults[r.IntN(len(faults))]
		a := r.IntN(3)
		b := (a + 1 + r.IntN(2)) % 3
		hold := time.Second + time.Duration(r.IntN(3000))*time.Millisecond
		f.inject(a, b)
		time.Sleep(hold) // the fault's duration is the point
		c.HealAll()
		healed := l.waitServing(t, 2*faultMemberTimeout+2*time.Second, fmt.Sprint(rounds))
		t.Logf("round %d: %s (%d, %d) for %v; serving again %v after the heal", rounds, f.name, a, b, hold, healed)
	}
	l.stopPublishers()
	l.checkHonest(t)
	t.Logf("%d fault rounds", rounds)
}

// total counts every delivery the inbox recorded.
func (g *groupInbox) total() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}
