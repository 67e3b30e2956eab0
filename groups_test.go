package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
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
	g.got[id] = append(g.got[id], received{data: string(m.Data), key: m.Key})
	g.n++
	g.mu.Unlock()
	return nil
}

func (g *groupInbox) of(id pubsub.SubscriberID) []received {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]received(nil), g.got[id]...)
}

func (g *groupInbox) total() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
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
		futures[i] = prod.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i), Key: fmt.Sprint("customer-", i%50)})
	}
	for i, f := range futures {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err, "message %d", i)
		require.Equal(t, 2, ack.Delivered, "the broadcast subscriber and the group, counted once")
		require.Empty(t, ack.Failures)
	}
	counts := checkGroup(t, in, members, want)
	t.Logf("keyed shares: %v", counts)
	assert.Len(t, all.of(broadcast.ID()), count, "the broadcast subscriber gets every message")
	for id, n := range counts {
		assert.Greater(t, n, 0, "%s got no key of 50", id)
	}
}

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
