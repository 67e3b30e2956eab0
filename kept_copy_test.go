package pubsub_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// inboxSpy records the DeliverBatch envelopes sent to one node's inbox,
// read on a connection of its own.
type inboxSpy struct {
	mu  sync.Mutex
	got []*wire.DeliverBatch
}

func spyInbox(t *testing.T, c *testcluster.Cluster, server int, inbox string) *inboxSpy {
	t.Helper()
	s := &inboxSpy{}
	nc := c.Connect(t, server)
	_, err := nc.Subscribe(inbox, func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) == nil && env.GetDeliver() != nil {
			s.mu.Lock()
			s.got = append(s.got, env.GetDeliver())
			s.mu.Unlock()
		}
	})
	require.NoError(t, err)
	require.NoError(t, nc.Flush())
	c.WaitForInterest(t, inbox, 5*time.Second)
	return s
}

// of returns the deliveries of topic seen so far.
func (s *inboxSpy) of(topic string) []*wire.DeliverBatch {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*wire.DeliverBatch
	for _, d := range s.got {
		if d.GetTopic() == topic {
			out = append(out, d)
		}
	}
	return out
}

func inboxOf(t *testing.T, n *pubsub.Node, id string) string {
	t.Helper()
	for _, m := range n.Members() {
		if m.ID == id {
			return m.Inbox
		}
	}
	t.Fatalf("%s is not in %s's view", id, n.ID())
	return ""
}

// A node that publishes through a remote owner to a topic it subscribes to
// keeps a copy of the batch, and the owner's delivery to it names the copy
// instead of carrying the messages back across the servers. Every ack
// level, messages with keys and headers, at-least-once topics and a
// consumer group's shares: each subscriber gets exactly what it got when
// the messages travelled, in order, and the publisher's node counts every
// delivery a hit.
func TestPublisherSubscribedGetsItsOwnBatchFromItsCopy(t *testing.T) {
	alo := pubsub.WithDeliveryMode(func(topic string) pubsub.DeliveryMode {
		if strings.HasPrefix(topic, "alo-") {
			return pubsub.AtLeastOnce
		}
		return pubsub.AtMostOnce
	})
	c := newCluster(t, 3, 3, alo)
	pub := c.Nodes[0]
	spy0 := spyInbox(t, c, 0, inboxOf(t, c.Nodes[1], "n0"))
	spy2 := spyInbox(t, c, 2, inboxOf(t, c.Nodes[1], "n2"))
	ctx := ctxT(t)

	cases := []struct {
		name   string
		prefix string
		level  pubsub.AckLevel
		meta   bool
		group  bool
	}{
		{"delivered", "kept-d", pubsub.AckDelivered, false, false},
		{"accepted", "kept-a", pubsub.AckAccepted, false, false},
		{"none", "kept-n", pubsub.AckNone, false, false},
		{"keys-and-headers", "kept-m", pubsub.AckDelivered, true, false},
		{"at-least-once", "alo-kept", pubsub.AckDelivered, false, false},
		{"at-least-once-accepted", "alo-kept-a", pubsub.AckAccepted, false, false},
		{"group", "kept-g", pubsub.AckDelivered, false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			topic := ownedTopic(t, pub, "n1", tc.prefix)
			rec := newRecorder()
			var opts []pubsub.SubscribeOption
			if tc.group {
				opts = append(opts, pubsub.WithGroup("g"))
			}
			var subs []*pubsub.Subscription
			for _, n := range c.Nodes {
				s, err := n.Subscribe(ctx, topic, rec.handler, opts...)
				require.NoError(t, err)
				subs = append(subs, s)
			}
			var broadcast *pubsub.Subscription // beside the group: only it makes the publisher keep a copy
			if tc.group {
				var err error
				broadcast, err = pub.Subscribe(ctx, topic, rec.handler)
				require.NoError(t, err)
			}
			before := pub.Stats()
			const batches, size = 4, 30
			var want []string
			for b := range batches {
				msgs := make([]pubsub.Outgoing, size)
				for i := range msgs {
					msgs[i].Data = msg(b*size + i)
					want = append(want, string(msgs[i].Data))
					if tc.meta {
						msgs[i].Key = fmt.Sprint("k", i%3)
						msgs[i].Header = map[string][]string{"h": {fmt.Sprint(i)}}
					}
				}
				ack, err := pub.PublishMessages(ctx, topic, msgs, pubsub.WithAck(tc.level))
				require.NoError(t, err)
				require.Equal(t, pubsub.Accepted, ack.Status, "ack %+v", ack)
				if tc.level == pubsub.AckDelivered {
					wantDelivered := 3
					if tc.group {
						wantDelivered = 2 // the group, the broadcast subscriber
					}
					assert.Equal(t, wantDelivered, ack.Delivered, "ack %+v", ack)
					assert.Empty(t, ack.Failures)
				}
			}
			total := len(want) * 3
			if tc.group {
				total = len(want) * 2
			}
			testcluster.WaitFor(t, 10*time.Second, func() bool { return rec.total() >= total }, "subscribers got %d of %d messages", rec.total(), total)
			if tc.group {
				// Every message once across the group, each member's in
				// order; the publisher's own member among them.
				var all []string
				for _, s := range subs {
					got := rec.of(s.ID())
					assert.IsIncreasing(t, got, "member %v", s.ID())
					assert.NotEmpty(t, got, "member %v got no share", s.ID())
					all = append(all, got...)
				}
				assert.ElementsMatch(t, want, all)
				assert.Equal(t, want, rec.of(broadcast.ID()))
				subs = append(subs, broadcast)
			} else {
				for _, s := range subs {
					assert.Equal(t, want, rec.of(s.ID()), "subscriber %v", s.ID())
				}
			}
			// What crossed the servers: no messages to the publisher's
			// node, the whole batch to the other one. An owner may merge
			// consecutive AckAccepted or AckNone requests into one batch,
			// and the publisher's AckNone outbox consecutive publishes
			// into one request: a delivery then names several copies, or
			// one of several publishes.
			var to0 []*wire.DeliverBatch
			testcluster.WaitFor(t, 5*time.Second, func() bool {
				to0 = spy0.of(topic)
				return len(to0) > 0 && uint64(len(to0)) >= pub.Stats().KeptCopyHits-before.KeptCopyHits
			}, "the spy saw %d deliveries to the publisher's node", len(to0))
			if tc.level == pubsub.AckDelivered {
				assert.Len(t, to0, batches)
			}
			after := pub.Stats()
			assert.Equal(t, uint64(len(to0)), after.KeptCopyHits-before.KeptCopyHits, "deliveries from the kept copies")
			assert.Zero(t, after.KeptCopyMisses-before.KeptCopyMisses)
			for _, d := range to0 {
				assert.NotEmpty(t, d.GetKeptCopy(), "a delivery to the publisher's node naming no copy: %d messages", d.GetCount())
				assert.Zero(t, d.GetCount()%size, "count %d", d.GetCount())
				assert.Empty(t, d.GetPacked())
				assert.Empty(t, d.GetPackedMeta())
			}
			for _, d := range spy2.of(topic) {
				assert.Empty(t, d.GetKeptCopy(), "a kept copy named to a node that did not publish")
			}
			for _, s := range subs {
				require.NoError(t, s.Unsubscribe(ctx))
			}
		})
	}
}

// ownedTopic returns a topic n's view gives to owner, named from prefix.
func ownedTopic(t *testing.T, n *pubsub.Node, owner, prefix string) string {
	t.Helper()
	for i := range 10_000 {
		topic := fmt.Sprint(prefix, "-", i)
		if o, err := n.OwnerOf(topic); err == nil && o.ID == owner {
			return topic
		}
	}
	t.Fatalf("no topic owned by %s", owner)
	return ""
}

// A node that no longer holds its copy answers NOT_KEPT, and the owner
// sends the batch with its messages: nothing is lost, the ack is the same,
// and the miss is counted. Here every copy expires at once, as when its
// delivery came past SubscriberTimeout + RequestTimeout.
func TestPublisherWithoutItsCopyGetsTheMessagesSent(t *testing.T) {
	c := newCluster(t, 3, 3)
	pub := c.Nodes[0]
	pub.ExpireKeptCopiesForTest()
	topic := ownedTopic(t, pub, "n1", "unkept")
	rec := newRecorder()
	for _, n := range c.Nodes {
		subscribe(t, n, topic, rec.handler)
	}
	spy0 := spyInbox(t, c, 0, inboxOf(t, c.Nodes[1], "n0"))
	ctx := ctxT(t)
	before := pub.Stats()
	for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
		ack, err := pub.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: msg(1)}, {Data: msg(2)}}, pubsub.WithAck(level))
		require.NoError(t, err)
		require.Equal(t, pubsub.Accepted, ack.Status)
		if level == pubsub.AckDelivered {
			mustAccept(t, ack, err, 3)
		}
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return rec.total() == 12 }, "subscribers got %d of 12 messages", rec.total())
	after := pub.Stats()
	assert.Equal(t, uint64(2), after.KeptCopyMisses-before.KeptCopyMisses)
	assert.Zero(t, after.KeptCopyHits-before.KeptCopyHits)
	var named, full int
	count := func() bool {
		named, full = 0, 0
		for _, d := range spy0.of(topic) {
			if len(d.GetKeptCopy()) > 0 {
				named++
			} else if len(d.GetPacked()) > 0 {
				full++
			}
		}
		return named+full >= 4
	}
	testcluster.WaitFor(t, 5*time.Second, count, "the spy saw %d deliveries naming the copy and %d with the messages", named, full)
	assert.Equal(t, 2, named, "deliveries naming the copy")
	assert.Equal(t, 2, full, "deliveries sent again with the messages")
}

// A node with no subscriber to the topic keeps no copy: the request names
// none and nothing is held. Nor does one with only a consumer-group
// member: its node is sent the member's share, a part of the batch.
func TestPublisherWithoutSubscribersKeepsNoCopy(t *testing.T) {
	c := newCluster(t, 3, 3)
	pub := c.Nodes[0]
	topic := ownedTopic(t, pub, "n1", "nokeep")
	rec := newRecorder()
	subscribe(t, c.Nodes[2], topic, rec.handler)
	ack, err := pub.PublishBatch(ctxT(t), topic, [][]byte{msg(1)})
	mustAccept(t, ack, err, 1)

	member, err := pub.Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
	require.NoError(t, err)
	_, err = c.Nodes[2].Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
	require.NoError(t, err)
	spy0 := spyInbox(t, c, 0, inboxOf(t, c.Nodes[1], "n0"))
	batch := make([][]byte, 40)
	for i := range batch {
		batch[i] = msg(i)
	}
	ack, err = pub.PublishBatch(ctxT(t), topic, batch)
	mustAccept(t, ack, err, 2)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(spy0.of(topic)) == 1 }, "no delivery to the publisher's node seen")
	d := spy0.of(topic)[0]
	assert.Empty(t, d.GetKeptCopy())
	assert.Equal(t, int(d.GetCount()), len(rec.of(member.ID())), "the member's node was sent its share alone")
	assert.Less(t, int(d.GetCount()), len(batch))
	copies, _ := pub.KeptCopiesForTest()
	assert.Zero(t, copies)
	st := pub.Stats()
	assert.Zero(t, st.KeptCopyHits+st.KeptCopyMisses)
}

// What a node answers to a delivery naming kept copies it cannot use:
// NOT_KEPT when it holds none under those numbers (the owner then sends
// the messages); SubscriberGone for each subscriber when the delivery is
// meant for an older incarnation of its ID, as with messages (a NOT_KEPT
// would make the owner send the batch again, to the older one too);
// BAD_REQUEST for copies and messages at once.
func TestDeliveryNamingCopiesTheNodeCannotUse(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedTopic(t, c.Nodes[0], "n0", "unusable")
	inc := memberRef(t, c.Nodes[1], "n1").GetIncarnation()
	raw := c.Connect(t, 1)
	owner := &wire.MemberRef{NodeId: "n0", Incarnation: memberRef(t, c.Nodes[1], "n0").GetIncarnation()}
	ask := func(d *wire.DeliverBatch) *wire.Reply {
		t.Helper()
		d.Owner, d.Topic, d.Count = owner, topic, 1
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: d}})
		require.NoError(t, err)
		m, err := raw.Request(inboxOf(t, c.Nodes[0], "n1"), data, 5*time.Second)
		require.NoError(t, err)
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(m.Data, &env))
		return env.GetReply()
	}
	rep := ask(&wire.DeliverBatch{Subscribers: []string{"ghost-1"}, KeptCopy: []uint64{12345}, ToIncarnation: inc})
	assert.Equal(t, wire.Reply_NOT_KEPT, rep.GetCode())
	rep = ask(&wire.DeliverBatch{Subscribers: []string{"ghost-1", "ghost-2"}, KeptCopy: []uint64{12345}, ToIncarnation: inc - 1})
	assert.Equal(t, wire.Reply_OK, rep.GetCode())
	assert.Equal(t, []uint32{uint32(pubsub.SubscriberGone), uint32(pubsub.SubscriberGone)}, rep.GetStatuses())
	before := c.Nodes[1].Stats().Malformed
	rep = ask(&wire.DeliverBatch{Subscribers: []string{"ghost-1"}, KeptCopy: []uint64{12345}, Packed: wire.Pack(nil, [][]byte{[]byte("z")})})
	assert.Equal(t, wire.Reply_BAD_REQUEST, rep.GetCode())
	assert.Equal(t, before+1, c.Nodes[1].Stats().Malformed)
	assert.Equal(t, uint64(1), c.Nodes[1].Stats().KeptCopyMisses, "the first one only")
}

// A publisher whose kept-copy store is at its bound sends its requests
// naming no copy: each is counted in KeptCopySkipped, and the owner sends
// the messages back, so its own subscriber still gets every one, in order.
func TestKeptCopyStoreFullIsCountedAndLosesNothing(t *testing.T) {
	c := newCluster(t, 3, 3)
	pub := c.Nodes[0]
	topic := ownedTopic(t, pub, "n1", "kept-full")
	rec := newRecorder()
	own := subscribe(t, pub, topic, rec.handler)
	pub.LimitKeptCopiesForTest(0) // below any batch: nothing fits
	before := pub.Stats()
	const publishes = 5
	var want []string
	for b := range publishes {
		batch := [][]byte{msg(2 * b), msg(2*b + 1)}
		want = append(want, string(batch[0]), string(batch[1]))
		ack, err := pub.PublishBatch(ctxT(t), topic, batch)
		mustAccept(t, ack, err, 1)
	}
	after := pub.Stats()
	assert.Equal(t, uint64(publishes), after.KeptCopySkipped-before.KeptCopySkipped, "requests sent naming no copy")
	assert.Zero(t, after.KeptCopyHits-before.KeptCopyHits)
	assert.Equal(t, want, rec.of(own.ID()), "the publisher's own subscriber, from the messages the owner sent back")
	copies, _ := pub.KeptCopiesForTest()
	assert.Zero(t, copies)
}
