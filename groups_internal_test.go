package pubsub

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

func TestSubsetSendsOnlyTheSharesMessages(t *testing.T) {
	data := [][]byte{[]byte("m0"), []byte("m1"), []byte("m2"), []byte("m3"), []byte("m4"), []byte("m5")}
	shares := []share{{local: "a@g", idx: []uint32{0, 3}}, {local: "b@g", idx: []uint32{4}}}
	for name, p := range map[string]payload{
		"publisher's slices": {msgs: msgBatch{data: data}, publisher: "n1"},
		"received, format 1": {packed: wire.Pack(nil, data), count: len(data), publisher: "n1"},
	} {
		t.Run(name, func(t *testing.T) {
			sub, moved, ok := p.subset(shares)
			require.True(t, ok)
			assert.Equal(t, [][]byte{[]byte("m0"), []byte("m3"), []byte("m4")}, sub.msgs.data)
			assert.Equal(t, []share{{local: "a@g", idx: []uint32{0, 1}}, {local: "b@g", idx: []uint32{2}}}, moved)
			assert.Equal(t, "n1", sub.publisher)
			msgs := sub.messages("t").msgs
			assert.Equal(t, "m3", string(msgs[moved[0].idx[1]].Data))
		})
	}
	all := []share{{local: "a@g", idx: []uint32{0, 1, 2}}, {local: "b@g", idx: []uint32{3, 4, 5}}}
	_, _, ok := (&payload{msgs: msgBatch{data: data}}).subset(all)
	assert.False(t, ok, "every message: the whole batch goes as is")
}

// Regression (review): a batch received with keys or headers (format 2)
// went whole to a node with only group members, and every node's subset
// walked the packed batch again. It is unpacked once, and each subset is
// packed anew: a message whose header repeated the one before it (a
// one-byte back-reference on the wire) keeps its header when that one is
// not in the subset.
func TestSubsetOfAKeyedBatch(t *testing.T) {
	data := [][]byte{[]byte("m0"), []byte("m1"), []byte("m2"), []byte("m3")}
	h := map[string][]string{"trace": {"t1"}}
	meta := []wire.Meta{wire.NewMeta("k0", h), wire.NewMeta("k1", h), {}, wire.NewMeta("k3", nil)}
	packed := wire.PackMeta(nil, data, meta)
	require.NoError(t, wire.ValidateMeta(packed, uint32(len(data))))
	p := payload{packed: packed, withMeta: true, count: len(data), publisher: "n1"}
	assert.Equal(t, []string{"k0", "k1", "", "k3"}, p.keys())

	for node, shares := range map[string][]share{
		"a": {{local: "x@g", idx: []uint32{1, 3}}}, // m1 repeats m0's header, which stays behind
		"b": {{local: "y@g", idx: []uint32{0, 2}}},
	} {
		t.Run(node, func(t *testing.T) {
			sub, moved, ok := p.subset(shares)
			require.True(t, ok, "a keyed batch went whole")
			require.Len(t, moved, 1)
			got, withMeta := sub.wire()
			require.True(t, withMeta, "the subset lost its keys and headers")
			require.NoError(t, wire.ValidateMeta(got, uint32(sub.len())))
			received, err := receivedPayload(nil, got, uint32(sub.len()))
			require.NoError(t, err)
			msgs := received.messages("t").msgs
			require.Len(t, msgs, len(shares[0].idx))
			for j, k := range shares[0].idx {
				m := msgs[moved[0].idx[j]]
				assert.Equal(t, string(data[k]), string(m.Data))
				assert.Equal(t, meta[k].Key, m.Key)
				assert.Equal(t, meta[k].Header, map[string][]string(m.Header), "message %d's header", k)
			}
		})
	}
	// The packed batch still goes as is to a node that gets all of it.
	whole, withMeta := p.wire()
	assert.True(t, withMeta)
	assert.Equal(t, packed, whole)
}

// A re-route moves only the messages of the delivery that failed: a member
// that processed its own share and then failed a re-routed one must not
// have its own share moved on (it would reach the group twice).
func TestReroutePlansOnlyTheFailedDelivery(t *testing.T) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.cfg.SubscriberTimeout, n.cfg.RequestTimeout = time.Minute, time.Minute
	n.members.views.cur.Store(newView(1, []Member{{ID: "o", Incarnation: 1}, {ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 1}, {ID: "c", Incarnation: 1}}))
	members := []SubscriberID{{Node: "a", Local: "1@g"}, {Node: "b", Local: "1@g"}, {Node: "c", Local: "1@g"}}
	g := newGroupRoute("g", slices.Clone(members))
	r := &reroutes{n: n, groups: map[string]*groupRoute{"g": g}, accepted: time.Now()}
	first, ok := r.plan(g.members[0], []uint32{0, 3}, MailboxFull)
	require.True(t, ok)
	var to SubscriberID
	for node, shares := range first {
		require.Len(t, shares, 1)
		assert.Equal(t, []uint32{0, 3}, shares[0].idx)
		to = SubscriberID{Node: node, Local: shares[0].local}
	}
	// That member then fails its own delivery (messages 1 and 4): only
	// those move, to the member left.
	second, ok := r.plan(to, []uint32{1, 4}, SubscriberGone)
	require.True(t, ok)
	require.Len(t, second, 1)
	for node, shares := range second {
		assert.Equal(t, []uint32{1, 4}, shares[0].idx)
		dest := SubscriberID{Node: node, Local: shares[0].local}
		assert.NotContains(t, []SubscriberID{g.members[0], to}, dest, "never back to a member that failed")
	}
	// Nobody is left once every member failed.
	var last SubscriberID
	for node, shares := range second {
		last = SubscriberID{Node: node, Local: shares[0].local}
	}
	_, ok = r.plan(last, []uint32{2}, SubscriberGone)
	assert.False(t, ok)
	// Too late.
	r2 := &reroutes{n: n, groups: r.groups, accepted: time.Now().Add(-2 * time.Minute)}
	_, ok = r2.plan(g.members[0], []uint32{0}, MailboxFull)
	assert.False(t, ok)
}

// The last member's unsubscribe ends its group even when a batch evicted
// the member as gone first (its node drops it before the owner hears).
func TestUnsubscribeAfterEvictionEndsTheGroup(t *testing.T) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	id := SubscriberID{Node: "a", Local: "1@g"}
	require.True(t, a.add(id.Node, 1, id.Local))
	require.True(t, a.remove(id, false))
	assert.True(t, a.groups.vanished["g"], "evicted as gone: the group vanished")
	a.unsubscribe(id)
	assert.False(t, a.groups.vanished["g"], "its unsubscribe ends it silently")
}

func TestSharesFromTheWireAreChecked(t *testing.T) {
	for name, c := range map[string]struct {
		shares []*wire.Share
		subs   []string
		ok     bool
	}{
		"fine":              {[]*wire.Share{{Subscriber: "a@g", Indices: []uint32{0, 2}}, {Subscriber: "b@g", Indices: []uint32{1}}}, []string{"x"}, true},
		"past the batch":    {[]*wire.Share{{Subscriber: "a@g", Indices: []uint32{3}}}, nil, false},
		"repeated index":    {[]*wire.Share{{Subscriber: "a@g", Indices: []uint32{1, 1}}}, nil, false},
		"decreasing":        {[]*wire.Share{{Subscriber: "a@g", Indices: []uint32{2, 1}}}, nil, false},
		"subscriber twice":  {[]*wire.Share{{Subscriber: "a@g", Indices: []uint32{0}}, {Subscriber: "a@g", Indices: []uint32{1}}}, nil, false},
		"also a subscriber": {[]*wire.Share{{Subscriber: "x", Indices: []uint32{0}}}, []string{"x"}, false},
	} {
		_, ok := sharesFromWire(c.shares, c.subs, 3)
		assert.Equal(t, c.ok, ok, name)
	}
}

// Split batches: two groups without live members are both listed, and a
// group delivered in one chunk but vanished in the next is not counted.
func TestChunkAcksKeepEveryVanishedGroup(t *testing.T) {
	var c chunkAcks
	c.add(0, ownerAnswer{ack: PublishAck{Delivered: 1, Failures: []DeliveryFailure{{Group: "g1", Status: SubscriberGone}}},
		delivered: []SubscriberID{{Local: groupMark + "g2"}}})
	c.add(1, ownerAnswer{ack: PublishAck{Failures: []DeliveryFailure{{Group: "g1", Status: SubscriberGone}, {Group: "g2", Status: SubscriberGone}}}})
	assert.Equal(t, []DeliveryFailure{{Group: "g1", Status: SubscriberGone}, {Group: "g2", Status: SubscriberGone}}, c.ack.Failures)
	assert.Zero(t, c.ack.Delivered)
}

// A subscriber an early answer (at the publisher's deadline) listed as
// Timeout before its node reported still gets the later chunks: its
// delivery goes on. Skipped, a slow subscriber got only the first chunk of
// a split batch. Once its node reports a failure, it is skipped.
func TestChunkAcksDoNotSkipAnUnreportedSubscriber(t *testing.T) {
	slow, failing := SubscriberID{Node: "s", Local: "1"}, SubscriberID{Node: "s", Local: "2"}
	var c chunkAcks
	c.add(0, ownerAnswer{ack: PublishAck{Failures: []DeliveryFailure{{Subscriber: slow, Status: Timeout}, {Subscriber: failing, Status: HandlerError}}},
		unreported: map[SubscriberID]bool{slow: true}})
	assert.Equal(t, []*wire.Failure{{Node: "s", Local: "2"}}, c.skip(1000))
	c.add(1, ownerAnswer{ack: PublishAck{Failures: []DeliveryFailure{{Subscriber: slow, Status: HandlerError}}}})
	assert.Equal(t, []*wire.Failure{{Node: "s", Local: "1"}, {Node: "s", Local: "2"}}, c.skip(1000), "reported failing: skipped")
	assert.Equal(t, []DeliveryFailure{{Subscriber: slow, Status: Timeout}, {Subscriber: failing, Status: HandlerError}}, c.ack.Failures, "listed with its first failure")

	// On the wire too.
	rep := ownerAnswer{code: wire.Reply_OK, ack: PublishAck{Failures: []DeliveryFailure{{Subscriber: slow, Status: Timeout}, {Subscriber: failing, Status: Timeout}}},
		unreported: map[SubscriberID]bool{slow: true}}.wire()
	assert.Equal(t, map[SubscriberID]bool{slow: true}, answerFromWire("t", rep).unreported)
}

// Keyless round robin keeps its place when the subscriber set changes: it
// restarted at the first member on every change, so with frequent changes
// that member got more than its share.
func TestGroupRoundRobinKeepsItsPlaceAcrossChanges(t *testing.T) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	for _, node := range []string{"a", "b", "c"} {
		require.True(t, a.add(node, 1, "1@g"))
	}
	got := map[string]int{}
	for i := range 9 {
		shares, _ := a.plan().assign(1, nil, batchOrigin{}, nil)
		for node := range shares {
			got[node]++
		}
		// A subscriber comes and goes after every batch, alternately a
		// broadcast one and a member of the group: the group's route is
		// rebuilt every other time.
		local := fmt.Sprintf("b%d", i)
		if i%2 == 1 {
			local += "@g"
		}
		require.True(t, a.add("x", 1, local))
		require.True(t, a.remove(SubscriberID{Node: "x", Local: local}, false))
	}
	assert.Equal(t, map[string]int{"a": 3, "b": 3, "c": 3}, got, "keyless messages per member")
}

// The vanished groups a topic actor reports (and adds to every ack) are
// bounded: group names that come and go must not grow the map, nor every
// ack, without end. Past maxVanishedGroups one is forgotten and logged.
func TestVanishedGroupsAreBounded(t *testing.T) {
	var logs strings.Builder
	n := &Node{self: Member{ID: "o", Incarnation: 1},
		log: nodeLogger{Logger: slog.New(slog.NewTextHandler(&logs, nil)), limit: logThrottle{interval: time.Hour}}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	for i := range maxVanishedGroups + 10 {
		require.True(t, a.add("a", 1, fmt.Sprintf("1@g%d", i)))
	}
	a.dropNode("a")
	assert.Len(t, a.groups.vanished, maxVanishedGroups)
	assert.Contains(t, logs.String(), "vanished consumer group forgotten")
}

// A change of the subscriber set rebuilds only the part of the fan-out
// plan it touched: a broadcast subscriber coming or going kept every
// group's route, whose key slots cost 4 096 rankings over its members (a
// broadcast join took 0.47 ms with a 50-member group), and a member of one
// group keeps the other groups' routes.
func TestPlanRebuildsOnlyWhatAChangeTouched(t *testing.T) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	for i := range 50 {
		require.True(t, a.add(fmt.Sprintf("n%d", i%5), 1, fmt.Sprintf("%d@big", i)))
	}
	require.True(t, a.add("n0", 1, "1@small"))
	require.True(t, a.add("n1", 1, "plain"))
	route := func(name string) *groupRoute {
		for _, g := range a.plan().groups {
			if g.name == name {
				return g
			}
		}
		return nil
	}
	big := route("big")
	require.NotNil(t, big)
	require.Len(t, big.members, 50)
	big.forKey("k") // builds its key slots
	small := route("small")

	require.True(t, a.add("n2", 1, "another"))
	assert.Same(t, big, route("big"), "a broadcast join rebuilt a group's route")
	assert.Equal(t, map[string][]string{"n1": {"plain"}, "n2": {"another"}}, a.plan().broadcast)
	require.True(t, a.remove(SubscriberID{Node: "n1", Local: "plain"}, true))
	assert.Same(t, big, route("big"), "a broadcast leave rebuilt a group's route")
	assert.Equal(t, map[string][]string{"n2": {"another"}}, a.plan().broadcast)

	require.True(t, a.add("n3", 1, "2@small"))
	assert.Same(t, big, route("big"), "a member of another group rebuilt this group's route")
	require.NotSame(t, small, route("small"))
	assert.Len(t, route("small").members, 2)

	require.True(t, a.remove(SubscriberID{Node: "n0", Local: "1@small"}, true))
	require.True(t, a.remove(SubscriberID{Node: "n3", Local: "2@small"}, true))
	assert.Nil(t, route("small"), "a group without members keeps a route")
	assert.Equal(t, []string{"big"}, func() (names []string) {
		for _, g := range a.plan().groups {
			names = append(names, g.name)
		}
		return names
	}())

	require.True(t, a.add("n4", 1, "50@big"))
	assert.Len(t, route("big").members, 51, "a join to the group rebuilt its route")
	assert.Equal(t, map[string][]string{"n2": {"another"}}, a.plan().broadcast)
}

// BenchmarkPlanBroadcastChurn measures a broadcast subscriber joining and
// leaving a topic that also has a keyed 50-member group, each change
// followed by a keyed batch's plan: the group's route and its key slots
// must survive both changes.
//
//	go test -run '^$' -bench PlanBroadcastChurn .
func BenchmarkPlanBroadcastChurn(b *testing.B) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	for i := range 50 {
		a.add(fmt.Sprintf("n%d", i%5), 1, fmt.Sprintf("%d@big", i))
	}
	b.ReportAllocs()
	for b.Loop() {
		a.add("x", 1, "plain")
		a.plan().groups[0].forKey("k")
		a.remove(SubscriberID{Node: "x", Local: "plain"}, true)
		a.plan().groups[0].forKey("k")
	}
}

// A share's fingerprint ignores the order of its messages and changes with
// any message's data or key, or their count.
func TestShareFingerprint(t *testing.T) {
	a := []Message{{Data: []byte("a")}, {Data: []byte("b"), Key: "k"}}
	same := []Message{{Data: []byte("b"), Key: "k"}, {Data: []byte("a")}}
	if fingerprint(a) != fingerprint(same) {
		t.Fatal("the same messages in another order have another fingerprint")
	}
	for name, other := range map[string][]Message{
		"data":  {{Data: []byte("a")}, {Data: []byte("c"), Key: "k"}},
		"key":   {{Data: []byte("a")}, {Data: []byte("b"), Key: "j"}},
		"count": {{Data: []byte("a")}},
		"more":  {{Data: []byte("a")}, {Data: []byte("b"), Key: "k"}, {Data: []byte("a")}},
	} {
		if fingerprint(a) == fingerprint(other) {
			t.Errorf("another %s, the same fingerprint", name)
		}
	}
}

func TestShareMessagesTakeOnlyTheShare(t *testing.T) {
	data := [][]byte{[]byte("m0"), []byte("m1"), []byte("m2")}
	hdr := map[string][]string{"h": {"v"}}
	meta := []wire.Meta{{Key: "k0"}, {}, {Key: "k2", Header: hdr}}
	p := payload{msgs: msgBatch{data: data, meta: meta}, publisher: "n1"}
	want := func(i int) Message {
		return Message{Topic: "t", Data: data[i], Key: meta[i].Key, Header: meta[i].Header, Publisher: "n1"}
	}

	t.Run("from the unpacked batch, without decoding the rest", func(t *testing.T) {
		got := p.shareMessages("t", nil, []uint32{2, 0})
		assert.Equal(t, []Message{want(2), want(0)}, got.msgs)
		got.release()
	})
	whole := p.messages("t")
	batch := whole.msgs
	t.Run("the whole batch in order is the batch itself, held once more", func(t *testing.T) {
		got := p.shareMessages("t", whole, []uint32{0, 1, 2})
		require.Same(t, whole, got, "the node's Messages, not a copy")
		assert.Equal(t, int32(2), whole.refs.Load())
		got.release()
	})
	t.Run("a part is a copy of its messages", func(t *testing.T) {
		got := p.shareMessages("t", whole, []uint32{1, 2})
		assert.Equal(t, []Message{want(1), want(2)}, got.msgs)
		assert.NotSame(t, &batch[1], &got.msgs[0])
		got.release()
	})
	t.Run("as many messages out of order are not the batch", func(t *testing.T) {
		got := p.shareMessages("t", whole, []uint32{2, 1, 0})
		assert.Equal(t, []Message{want(2), want(1), want(0)}, got.msgs)
		assert.NotSame(t, whole, got)
		got.release()
	})
	assert.Equal(t, int32(1), whole.refs.Load(), "every share's hold was released")
}

// Whether a member's SubscriberGone re-routes its share depends on how it
// was found, not on the view when it is read: a node that left the view
// (path) may have run the share before, and may be back, wrongly
// suspected, by the time its batch's status is read; on an at-most-once
// topic its share must not run twice.
func TestRerouteOfAGoneMemberDependsOnHowItWasFound(t *testing.T) {
	for _, tc := range []struct {
		name                               string
		atLeastOnce, partial, path, replay bool
		want                               bool
	}{
		{name: "its node said so, or was never sent it", want: true},
		{name: "its node left the view", path: true, want: false},
		{name: "its node said how far it got, then left", partial: true, path: true, want: true},
		{name: "its node left the view, at least once", atLeastOnce: true, path: true, want: true},
		// A retry the group saw before: the member may have run its share
		// in the first attempt and ended since.
		{name: "a retry: its node said so", replay: true, want: false},
		{name: "a retry: its node said how far it got with this copy", replay: true, partial: true, want: true},
		{name: "a retry, at least once", replay: true, atLeastOnce: true, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &reroutes{atLeastOnce: tc.atLeastOnce}
			if tc.replay {
				r.replayed = map[string]bool{"g": true}
			}
			assert.Equal(t, tc.want, r.reroutable("g", SubscriberGone, tc.partial, tc.path))
		})
	}
	r := &reroutes{}
	assert.True(t, r.reroutable("g", MailboxFull, false, false), "a full mailbox never ran it")
	assert.False(t, r.reroutable("g", Timeout, false, true), "a timeout may have run it, at most once")
	assert.False(t, r.reroutable("g", HandlerError, false, false), "a handler's error is not retried")
	r.replayed = map[string]bool{"g": true}
	assert.False(t, r.reroutable("g", MailboxFull, false, false), "a retry's full mailbox says nothing of the first attempt")
	assert.True(t, r.reroutable("other", MailboxFull, false, false), "only the groups that saw the batch")
}

// A producer's batch assigned again (a retry) starts round robin where it
// started the first time, and does not move it; the positions remembered
// are bounded.
func TestGroupRoundRobinReplaysARetriedBatch(t *testing.T) {
	n := &Node{self: Member{ID: "o", Incarnation: 1}}
	n.events = newEventStream("o")
	a := &topicActor{n: n, topic: "t"}
	for _, node := range []string{"a", "b", "c"} {
		require.True(t, a.add(node, 1, "1@g"))
	}
	memberOf := func(origin batchOrigin) string {
		shares, _ := a.plan().assign(1, nil, origin, nil)
		for node := range shares {
			return node
		}
		return ""
	}
	first := memberOf(batchOrigin{producer: "p", seq: 5})
	assert.Equal(t, first, memberOf(batchOrigin{producer: "p", seq: 5}), "the retry")
	assert.Equal(t, first, memberOf(batchOrigin{producer: "p", seq: 5}), "another retry")
	next := memberOf(batchOrigin{producer: "p", seq: 6})
	assert.NotEqual(t, first, next, "the next batch goes on round robin")
	assert.NotEqual(t, next, memberOf(batchOrigin{producer: "q", seq: 1}), "nor did the retries move it")

	// A pipelined producer retries batch 7 after batch 8 was assigned; a
	// split batch retries chunk 0 after chunk 1 was.
	seven := memberOf(batchOrigin{producer: "p", seq: 7})
	eight := memberOf(batchOrigin{producer: "p", seq: 8})
	assert.Equal(t, seven, memberOf(batchOrigin{producer: "p", seq: 7}), "an earlier batch's retry")
	assert.Equal(t, eight, memberOf(batchOrigin{producer: "p", seq: 8}), "and the later one's")
	for i := range maxRRBatches {
		memberOf(batchOrigin{producer: "p", seq: uint64(100 + i)})
	}
	assert.Len(t, a.plan().groups[0].starts["p"], maxRRBatches)

	for i := range 2 * maxRRStarts {
		memberOf(batchOrigin{producer: fmt.Sprint("p", i), seq: 1})
	}
	assert.LessOrEqual(t, len(a.plan().groups[0].starts), maxRRStarts)
}
