package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// groupInbox records what each subscription of a test received, with keys.
type groupInbox struct {
	mu  sync.Mutex
	got map[pubsub.SubscriberID][]received
	n   int
}

func newGroupInbox() *groupInbox {
	return &groupInbox{got: map[pubsub.SubscriberID][]received{}}
}

func (g *groupInbox) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	g.mu.Lock()
	g.got[id] = append(g.got[id], received{data: string(m.Data), key: m.Key, header: m.Header})
	g.n++
	g.mu.Unlock()
	return nil
}

func (g *groupInbox) of(id pubsub.SubscriberID) []received {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]received(nil), g.got[id]...)
}

// subscribeGroup subscribes one member of group on each listed node.
func subscribeGroup(t *testing.T, nodes []*pubsub.Node, topic, group string, h pubsub.Handler) []*pubsub.Subscription {
	t.Helper()
	var subs []*pubsub.Subscription
	for _, n := range nodes {
		s, err := n.Subscribe(ctxT(t), topic, h, pubsub.WithGroup(group))
		require.NoError(t, err)
		require.Equal(t, group, s.Group())
		require.Equal(t, group, s.ID().Group())
		subs = append(subs, s)
	}
	return subs
}

// checkGroup asserts that the members of one group together got every
// message of want exactly once, each key on one member only, in order.
func checkGroup(t *testing.T, in *groupInbox, members []*pubsub.Subscription, want []string) map[pubsub.SubscriberID]int {
	t.Helper()
	seen := map[string]int{}
	keyOwner := map[string]pubsub.SubscriberID{}
	counts := map[pubsub.SubscriberID]int{}
	for _, m := range members {
		got := in.of(m.ID())
		counts[m.ID()] = len(got)
		last := map[string]int{}
		for _, r := range got {
			seen[r.data]++
			if r.key == "" {
				continue
			}
			if o, ok := keyOwner[r.key]; ok && o != m.ID() {
				t.Fatalf("key %s reached %s and %s", r.key, o, m.ID())
			}
			keyOwner[r.key] = m.ID()
			var i int
			_, _ = fmt.Sscanf(r.data, "m%d", &i)
			if p, ok := last[r.key]; ok && i <= p {
				t.Fatalf("key %s out of order at %s: %d after %d", r.key, m.ID(), i, p)
			}
			last[r.key] = i
		}
	}
	for _, w := range want {
		if seen[w] != 1 {
			t.Fatalf("message %s reached the group %d times", w, seen[w])
		}
	}
	require.Len(t, seen, len(want), "messages the group got")
	return counts
}

func TestGroupKeyedMessagesGoToOneMemberInOrder(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "orders")
	in := newGroupInbox()
	members := subscribeGroup(t, c.Nodes, topic, "billing", in.handler)
	all := newGroupInbox()
	broadcast := subscribe(t, c.Nodes[0], topic, all.handler)

	prod, err := pubsub.NewBatchingProducer(c.Nodes[2], topic, pubsub.ProducerConfig{MaxInFlight: 4})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	const count = 3000
	var want []string
	futures := make([]*pubsub.Produced, count)
	for i := range futures {
		want = append(want, string(msg(i)))
		futures[i] = prod.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i), Key: fmt.Sprint("customer-", i%50), Header: groupHeader(i)})
	}
	for i, f := range futures {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, "message %d", i)
		require.Equal(t, 2, ack.Delivered, "the broadcast subscriber and the group, counted once")
		require.Empty(t, ack.Failures)
	}
	counts := checkGroup(t, in, members, want)
	t.Logf("keyed shares: %v", counts)
	// Every member, on the owner's node (its share taken from the batch the
	// owner holds), on a node with a broadcast subscriber (the whole batch)
	// and on one with only the member (its messages, packed for it alone,
	// where a header repeating the previous message's in the batch may not
	// repeat it in the share), gets each message with its key and header.
	for _, m := range members {
		for _, r := range in.of(m.ID()) {
			var i int
			_, _ = fmt.Sscanf(r.data, "m%d", &i)
			require.Equal(t, fmt.Sprint("customer-", i%50), r.key, "%s at %s", r.data, m.ID())
			require.Equal(t, groupHeader(i), r.header, "%s at %s", r.data, m.ID())
		}
	}
	assert.Len(t, all.of(broadcast.ID()), count, "the broadcast subscriber gets every message")
	for id, n := range counts {
		assert.Greater(t, n, 0, "%s got no key of 50", id)
	}
}

// groupHeader is message i's header: none for every fifth, one map shared
// by runs of three (sent once and then as "the previous one again"), so a
// batch has repeats, changes and gaps.
func groupHeader(i int) pubsub.Header {
	if i%5 == 0 {
		return nil
	}
	groupHeaders.Lock()
	defer groupHeaders.Unlock()
	h, ok := groupHeaders.runs[i/3]
	if !ok {
		h = pubsub.Header{"run": {fmt.Sprint(i / 3)}}
		groupHeaders.runs[i/3] = h
	}
	return h
}

var groupHeaders = struct {
	sync.Mutex
	runs map[int]pubsub.Header
}{runs: map[int]pubsub.Header{}}

func TestGroupKeylessMessagesAreSpread(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "jobs")
	in := newGroupInbox()
	members := subscribeGroup(t, c.Nodes, topic, "workers", in.handler)
	var want []string
	for i := 0; i < 3000; i += 100 {
		batch := make([][]byte, 100)
		for j := range batch {
			batch[j] = msg(i + j)
			want = append(want, string(msg(i+j)))
		}
		ack, err := c.Nodes[1].PublishBatch(ctxT(t), topic, batch)
		mustAccept(t, ack, err, 1)
	}
	counts := checkGroup(t, in, members, want)
	for id, n := range counts {
		assert.GreaterOrEqual(t, n, 600, "%s got %d of 3000", id, n)
	}
}

func TestTwoGroupsAndBroadcastShareATopic(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[2], "events")
	a, b, all := newGroupInbox(), newGroupInbox(), newGroupInbox()
	ma := subscribeGroup(t, c.Nodes, topic, "audit", a.handler)
	mb := subscribeGroup(t, c.Nodes[:2], topic, "search", b.handler)
	s := subscribe(t, c.Nodes[1], topic, all.handler)
	var want []string
	for i := range 300 {
		out := pubsub.Outgoing{Data: msg(i)}
		if i%2 == 0 {
			out.Key = fmt.Sprint("k", i%7)
		}
		ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{out})
		mustAccept(t, ack, err, 3)
		want = append(want, string(msg(i)))
	}
	checkGroup(t, a, ma, want)
	checkGroup(t, b, mb, want)
	assert.Len(t, all.of(s.ID()), 300)
}

// A group whose only member's node crashed is reported SubscriberGone with
// its name until a member joins again; a group whose last member
// unsubscribed ends silently.
func TestGroupWithoutLiveMembers(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "lonely")
	in := newGroupInbox()
	subscribeGroup(t, c.Nodes[2:], topic, "gone", in.handler)
	quitter := subscribeGroup(t, c.Nodes[1:2], topic, "quitter", in.handler)[0]
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("first"))
	mustAccept(t, ack, err, 2)

	require.NoError(t, quitter.Unsubscribe(ctxT(t)))
	c.Crash(2)
	c.WaitConverged(t, 10*time.Second, 0, 1)
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		ack, err = c.Nodes[0].Publish(ctxT(t), topic, []byte("later"))
		return err == nil && len(ack.Failures) == 1 && ack.Failures[0].Subscriber.Node == ""
	}, "no SubscriberGone for the vanished group: %+v %v", ack, err)
	assert.Equal(t, pubsub.DeliveryFailure{Group: "gone", Status: pubsub.SubscriberGone}, ack.Failures[0])
	assert.Zero(t, ack.Delivered)
	// The same through a remote owner's answer.
	ack, err = c.Nodes[1].Publish(ctxT(t), topic, []byte("remote"))
	require.NoError(t, err)
	assert.Equal(t, []pubsub.DeliveryFailure{{Group: "gone", Status: pubsub.SubscriberGone}}, ack.Failures)

	// A new member brings the group back.
	subscribeGroup(t, c.Nodes[1:2], topic, "gone", in.handler)
	ack, err = c.Nodes[0].Publish(ctxT(t), topic, []byte("back"))
	mustAccept(t, ack, err, 1)
}

func TestWithGroupValidatesTheName(t *testing.T) {
	c := newCluster(t, 1, 1)
	_, err := c.Nodes[0].Subscribe(ctxT(t), "t", newRecorder().handler, pubsub.WithGroup("bad name"))
	require.ErrorIs(t, err, pubsub.ErrInvalidConfig)
}

// A member whose mailbox is full does not lose its share: the owner sends
// it to the next member, on another node or on the owner itself (where a
// re-route once came back as that member's earlier status, unprocessed),
// and the group counts as delivered.
func TestGroupReroutesAShareOnMailboxFull(t *testing.T) {
	for name, freeOn := range map[string]int{"to another node": 2, "to the owner's node": 0} {
		t.Run(name, func(t *testing.T) { rerouteOnMailboxFull(t, freeOn) })
	}
}

func rerouteOnMailboxFull(t *testing.T, freeOn int) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "reroute")
	in := newGroupInbox()
	release := make(chan struct{})
	unblock := sync.OnceFunc(func() { close(release) })
	defer unblock() // a failing test must not leave the handler blocked
	started := make(chan struct{}, 16)
	blocked, err := c.Nodes[1].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		started <- struct{}{}
		<-release
		return in.handler(ctx, m)
	}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	require.NoError(t, err)
	free := subscribeGroup(t, c.Nodes[freeOn:freeOn+1], topic, "g", in.handler)[0]

	// Batches of two messages: one for each member, round robin.
	batch := func(i int) [][]byte { return [][]byte{msg(2 * i), msg(2*i + 1)} }
	var pending sync.WaitGroup
	for i := range 2 { // one running in the blocked handler, one queued
		pending.Go(func() { _, _ = c.Nodes[0].PublishBatch(context.Background(), topic, batch(i)) })
		if i == 0 {
			<-started
		}
	}
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[1].Stats().MaxMailboxDepth >= 1 }, "second batch never queued")
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, batch(2))
	mustAccept(t, ack, err, 1) // the full mailbox's share went to the other member
	got := in.of(free.ID())
	require.Len(t, got, 4, "the free member's message of each batch, and the re-routed one")
	assert.ElementsMatch(t, []string{string(msg(4)), string(msg(5))}, []string{got[2].data, got[3].data})

	unblock()
	pending.Wait()
	all := map[string]int{}
	for _, s := range []*pubsub.Subscription{blocked, free} {
		for _, r := range in.of(s.ID()) {
			all[r.data]++
		}
	}
	for i := range 6 {
		assert.Equal(t, 1, all[string(msg(i))], "message %d reached the group once", i)
	}
}

// A member leaving mid-stream (its node crashing, or unsubscribing): the
// keys of the other members stay where they were, the leaver's keys move to
// them, nothing accepted after the change is lost, and no message reaches
// the group twice.
func TestGroupSurvivesAMemberLeaving(t *testing.T) {
	leakcheck.Parallel(t)
	for _, how := range []string{"crash", "unsubscribe"} {
		t.Run(how, func(t *testing.T) { groupMemberLeaves(t, how) })
	}
}

func groupMemberLeaves(t *testing.T, how string) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "crash")
	in := newGroupInbox()
	members := subscribeGroup(t, c.Nodes, topic, "g", in.handler)
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	produce := func(from, to int) []*pubsub.Produced {
		var fs []*pubsub.Produced
		for i := from; i < to; i++ {
			fs = append(fs, prod.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i), Key: fmt.Sprint("k", i%30)}))
		}
		return fs
	}
	for _, f := range produce(0, 600) {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err)
		require.Equal(t, 1, ack.Delivered)
	}
	before := map[string]pubsub.SubscriberID{}
	for _, m := range members {
		for _, r := range in.of(m.ID()) {
			before[r.key] = m.ID()
		}
	}
	during := produce(600, 900)
	if how == "crash" {
		c.Crash(2)
		c.WaitConverged(t, 10*time.Second, 0, 1)
	} else {
		require.NoError(t, members[2].Unsubscribe(ctxT(t)))
	}
	after := produce(900, 1500)
	for _, f := range append(during, after...) {
		_, _ = f.Wait(ctxT(t)) // some in flight at the crash fail: at most once
	}
	for i, f := range after {
		ack, err, done := f.Result()
		require.True(t, done)
		require.NoError(t, err)
		require.Equal(t, 1, ack.Delivered, "message %d after the view change", 900+i)
	}
	seen := map[string]int{}
	for _, m := range members {
		for _, r := range in.of(m.ID()) {
			seen[r.data]++
			if owner, ok := before[r.key]; ok && owner != members[2].ID() {
				var i int
				_, _ = fmt.Sscanf(r.data, "m%d", &i)
				if i >= 900 {
					require.Equal(t, owner, m.ID(), "key %s of a surviving member moved", r.key)
				}
			}
		}
	}
	for d, k := range seen {
		require.Equal(t, 1, k, "%s reached the group %d times", d, k)
	}
	for i := 900; i < 1500; i++ {
		require.Equal(t, 1, seen[string(msg(i))], "message %d accepted after the view change", i)
	}
}

// Group membership is soft state like any subscription: when the owner
// crashes, the new owner rebuilds the groups from the members' nodes.
func TestGroupSurvivesItsOwnersCrash(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "owner-crash")
	in := newGroupInbox()
	members := subscribeGroup(t, c.Nodes[1:], topic, "g", in.handler)
	all := newGroupInbox()
	broadcast := subscribe(t, c.Nodes[2], topic, all.handler)
	c.Crash(0)
	c.WaitConverged(t, 10*time.Second, 1, 2)
	var want []string
	for i := range 200 {
		out := []pubsub.Outgoing{{Data: msg(i), Key: fmt.Sprint("k", i%9)}}
		testcluster.WaitFor(t, 5*time.Second, func() bool {
			ack, err := c.Nodes[1].PublishMessages(ctxT(t), topic, out)
			return err == nil && ack.Delivered == 2 && len(ack.Failures) == 0
		}, "message %d not delivered to the broadcast subscriber and the group", i)
		want = append(want, string(msg(i)))
	}
	checkGroup(t, in, members, want)
	assert.Len(t, all.of(broadcast.ID()), 200)
	sizes := c.Nodes[1].Stats().Groups[topic]
	if owner, _ := c.Nodes[1].OwnerOf(topic); owner.ID != c.Nodes[1].ID() {
		sizes = c.Nodes[2].Stats().Groups[topic]
	}
	assert.Equal(t, map[string]int{"g": 2}, sizes, "Stats().Groups on the new owner")
	ts, err := c.Nodes[2].TopicStats(ctxT(t), topic)
	require.NoError(t, err)
	assert.Equal(t, map[string]int{"g": 2}, ts.Groups, "TopicStats from any node")
	assert.Equal(t, 3, ts.Total)
}

func TestGroupEventsCarryTheGroup(t *testing.T) {
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[0], "group-events")
	var mu sync.Mutex
	var added []pubsub.SubscriberAdded
	var failed []pubsub.DeliveryFailed
	cancel := c.Nodes[0].Events().Subscribe(func(e pubsub.Event) {
		mu.Lock()
		defer mu.Unlock()
		switch e := e.(type) {
		case pubsub.SubscriberAdded:
			added = append(added, e)
		case pubsub.DeliveryFailed:
			failed = append(failed, e)
		}
	})
	defer cancel()
	s := subscribeGroup(t, c.Nodes[1:], topic, "g", func(context.Context, *pubsub.Message) error { return fmt.Errorf("fails") })[0]
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
	require.NoError(t, err)
	require.Equal(t, []pubsub.DeliveryFailure{{Subscriber: s.ID(), Status: pubsub.HandlerError, Group: "g"}}, ack.Failures)
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(added) == 1 && len(failed) == 1
	}, "events not seen")
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, "g", added[0].Group)
	assert.Equal(t, "g", failed[0].Group)
	assert.Equal(t, s.ID(), failed[0].Subscriber)
}

// On an AtLeastOnce topic a member that times out has its share re-routed
// too (the Timeout comes after SubscriberTimeout: the window allows it).
func TestGroupReroutesATimeoutAtLeastOnce(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithSubscriberTimeout(500*time.Millisecond),
		pubsub.WithDeliveryMode(func(string) pubsub.DeliveryMode { return pubsub.AtLeastOnce }))
	topic := ownedBy(t, c.Nodes[0], "slow")
	in := newGroupInbox()
	release := make(chan struct{})
	defer close(release)
	_, err := c.Nodes[1].Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error {
		// Blocks past its ctx: returning ctx's error could beat the
		// timeout's report and read as HandlerError (not re-routed).
		<-release
		return nil
	}, pubsub.WithGroup("g"))
	require.NoError(t, err)
	free := subscribeGroup(t, c.Nodes[2:], topic, "g", in.handler)[0]
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, [][]byte{msg(0), msg(1)})
	mustAccept(t, ack, err, 1)
	var got []string
	for _, r := range in.of(free.ID()) {
		got = append(got, r.data)
	}
	assert.ElementsMatch(t, []string{string(msg(0)), string(msg(1))}, got, "the free member ran both")
}

// Regression (probe): on an AtLeastOnce topic, a member whose node never
// reports (here the route from the owner to it is stalled) was reported
// Timeout only when the re-route window had closed: the owner re-sent
// until SubscriberTimeout + RequestTimeout/2, exactly the last moment a
// re-route may start. It now gives up a quarter of a RequestTimeout
// earlier, and the live member gets the share.
func TestGroupReroutesAnUnreachableMemberAtLeastOnce(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 3, append(append([]pubsub.Option{}, fast...),
		pubsub.WithSubscriberTimeout(500*time.Millisecond), pubsub.WithDeliveryMode(atLeastOnce))...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "unreachable")
	in := newGroupInbox()
	members := subscribeGroup(t, c.Nodes[1:], topic, "g", in.handler)
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, [][]byte{msg(0), msg(1)})
	mustAccept(t, ack, err, 1)
	require.Len(t, in.of(members[0].ID()), 1, "keyless: one message each")

	c.StallRoute(0, 1) // the owner's deliveries to n1's member are held; n1's heartbeats still reach it
	ack, err = c.Nodes[0].PublishBatch(ctxT(t), topic, [][]byte{msg(2), msg(3)})
	mustAccept(t, ack, err, 1)
	var got []string
	for _, r := range in.of(members[1].ID()) {
		got = append(got, r.data)
	}
	assert.Subset(t, got, []string{string(msg(2)), string(msg(3))}, "the reachable member ran the unreachable one's share too")
	c.HealAll()
}

// Regression (probe): a subscription that ended partway through a batch
// (Unsubscribe while its handler ran) was reported Delivered, so the ack
// counted a delivery that did not happen and, for a group member, the
// rest of its share was lost without a word. The batch is SubscriberGone
// for it, and only the rest of a member's share is re-routed: the group
// gets every message once.
func TestUnsubscribeMidBatchIsNotReportedDelivered(t *testing.T) {
	for _, tc := range []struct {
		group   string
		leaving int // the node of the leaving subscriber: 0 owns the topic
	}{{"", 1}, {"g", 1}, {"", 0}, {"g", 0}} {
		group := tc.group
		t.Run(fmt.Sprintf("group=%s/on-n%d", group, tc.leaving), func(t *testing.T) {
			c := newCluster(t, 1, 2)
			topic := ownedBy(t, c.Nodes[0], "midbatch")
			var opts []pubsub.SubscribeOption
			if group != "" {
				opts = append(opts, pubsub.WithGroup(group))
			}
			in := newGroupInbox()
			started, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			free := func() { once.Do(func() { close(release) }) }
			t.Cleanup(free)
			var first atomic.Bool
			leaving, err := c.Nodes[tc.leaving].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
				require.NoError(t, in.handler(ctx, m))
				if first.CompareAndSwap(false, true) {
					close(started) // its first message: it unsubscribes meanwhile
					<-release
				}
				return nil
			}, opts...)
			require.NoError(t, err)
			members := []*pubsub.Subscription{leaving}
			if group != "" {
				other, err := c.Nodes[1-tc.leaving].Subscribe(ctxT(t), topic, in.handler, opts...)
				require.NoError(t, err)
				members = append(members, other)
			}
			var batch [][]byte
			var want []string
			for i := range 6 {
				batch, want = append(batch, msg(i)), append(want, string(msg(i)))
			}
			type result struct {
				ack pubsub.PublishAck
				err error
			}
			done := make(chan result, 1)
			go func() {
				ack, err := c.Nodes[0].PublishBatch(context.Background(), topic, batch)
				done <- result{ack, err}
			}()
			select {
			case <-started:
			case <-time.After(10 * time.Second):
				t.Fatal("the handler never started")
			}
			require.NoError(t, leaving.Unsubscribe(ctxT(t)))
			free()
			var r result
			select {
			case r = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("no ack")
			}
			require.NoError(t, r.err)
			got := in.of(leaving.ID())
			require.Len(t, got, 1, "a message reached the handler after Unsubscribe returned")
			if group == "" {
				assert.Equal(t, 0, r.ack.Delivered, "the ack counts a delivery that did not happen")
				require.Len(t, r.ack.Failures, 1)
				assert.Equal(t, pubsub.SubscriberGone, r.ack.Failures[0].Status)
				assert.Equal(t, leaving.ID(), r.ack.Failures[0].Subscriber)
				return
			}
			// The rest of the leaving member's share went to the other one.
			assert.Equal(t, 1, r.ack.Delivered, "the group, counted once: %+v", r.ack)
			assert.Empty(t, r.ack.Failures)
			checkGroup(t, in, members, want)
		})
	}
}
