package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A node cut off (its connection stalled both ways) past MemberTimeout is
// dropped; a replacement joins under its ID meanwhile; then the stall
// heals. Peers keep the newer incarnation and ignore the older one's
// heartbeats; the older one must not carry on as a zombie (serving topics
// nobody routes to it, its subscriptions known to no owner): its peers
// tell it, and it stops as a node whose connection closed does, with
// NodeStopped and its subscriptions ended with an error saying why
// (guarantee 9: every live subscription receives again, or has ended with
// an error saying why). The replacement serves on. Before the fix the
// older node ran on for good: 5 of 5 runs.
func TestSupersededNodesSubscriptionReceivesOrEnds(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "superseded-sub")
	rec := newRecorder()
	older := c.Nodes[2]
	stopped := make(chan pubsub.NodeStopped, 1)
	cancel := older.Events().Subscribe(func(e pubsub.Event) {
		if s, ok := e.(pubsub.NodeStopped); ok {
			stopped <- s
		}
	})
	defer cancel()
	sz := subscribe(t, older, topic, rec.handler)
	c.Client(2).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	c.HealAll()
	healed := time.Now()
	select {
	case <-sz.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("the older incarnation's subscription still runs 10 s after the heal; older view %v, peers' %v, replacement's %v",
			older.Members(), c.Nodes[0].Members(), n2.Members())
	}
	t.Logf("older stopped %v after the heal", time.Since(healed))
	require.ErrorIs(t, sz.Err(), pubsub.ErrClosed)
	assert.Contains(t, sz.Err().Error(), "another node joined with its ID")
	select {
	case e := <-stopped:
		assert.Equal(t, "n2", e.Node)
		assert.ErrorIs(t, e.Err, pubsub.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("no NodeStopped event on the older incarnation")
	}
	_, err := older.Publish(ctxT(t), topic, []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrClosed, "a call on the stopped older incarnation")
	require.NoError(t, older.Close(ctxT(t)))

	// The replacement and its peers were not disturbed.
	s := subscribe(t, n2, topic, rec.handler)
	for i := range 20 {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		require.NoError(t, err, "publish %d", i)
		require.Equal(t, 1, ack.Delivered, "publish %d: ack %+v", i, ack)
	}
	assert.Len(t, rec.of(s.ID()), 20, "the replacement's subscription")
	assert.True(t, hasMember(c.Nodes[0], "n2") && hasMember(c.Nodes[1], "n2"), "peers keep the replacement")
}

// The replacement's subscriptions after the heal: deliveries to the ID's
// inbox subject reach the older incarnation too, which answered
// SubscriberGone for subscribers it does not have; when its answer came
// first the owner dropped the replacement's live subscription, and later
// publishes were acked Delivered 0 with no failure while it lived.
func TestSupersededNodeDoesNotAnswerForItsReplacement(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "superseded-repl")
	c.Client(2).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	c.HealAll()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(c.Nodes[2].Members()) == 3 }, "older did not hear its peers again")
	rec := newRecorder()
	s := subscribe(t, n2, topic, rec.handler)
	bad := 0
	for i := range 50 {
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		if err != nil || ack.Delivered != 1 || len(ack.Failures) != 0 {
			bad++
			if bad <= 3 {
				t.Errorf("publish %d: ack %+v, err %v", i, ack, err)
			}
		}
	}
	t.Logf("replacement's subscription ran %d of 50; ended: %v", len(rec.of(s.ID())), s.Err())
	require.Zero(t, bad)
}

// The race behind TestSupersededNodeDoesNotAnswerForItsReplacement's
// rare failure (1 CI run in about 15): right after the heal the older
// incarnation may get a delivery for the replacement's subscriber before it
// has heard the replacement's heartbeat, and answered SubscriberGone, so
// the owner dropped a live subscription without a word. The owner now
// names, in every delivery, the incarnation it registered the node's
// subscribers under, and a node stays silent on a delivery meant for a
// newer incarnation of its ID. One meant for an older one (a restarted
// node's previous life, which the owner has not dropped yet) is still
// answered SubscriberGone, so owners forget those subscribers at once.
func TestDeliveryForANewerIncarnationGoesUnanswered(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[0], "to-incarnation")
	inc := memberRef(t, c.Nodes[1], "n1").GetIncarnation()
	raw := c.Connect(t, 1)

	// A real delivery names the receiving node's incarnation.
	named := make(chan uint64, 16)
	tap, err := raw.Subscribe("pubsub.node.n1", func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) == nil && env.GetDeliver() != nil {
			select {
			case named <- env.GetDeliver().GetToIncarnation():
			default:
			}
		}
	})
	require.NoError(t, err)
	defer func() { _ = tap.Unsubscribe() }()
	require.NoError(t, raw.Flush())
	rec := newRecorder()
	sub := subscribe(t, c.Nodes[1], topic, rec.handler)
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	require.NoError(t, err)
	require.Equal(t, 1, ack.Delivered, "ack %+v", ack)
	select {
	case got := <-named:
		assert.Equal(t, inc, got, "the delivery's to_incarnation")
	case <-time.After(5 * time.Second):
		t.Fatal("the tap saw no delivery to n1")
	}

	// Forged deliveries naming subscribers n1 does not have, one request
	// after another on one connection: a node handles its inbox in order
	// and answers unknown subscribers at once, so an answer to the first
	// would come first. Each names a different number of subscribers, to
	// tell the answers apart by their statuses.
	replies := make(chan *nats.Msg, 8)
	inbox := raw.NewRespInbox()
	rs, err := raw.ChanSubscribe(inbox, replies)
	require.NoError(t, err)
	defer func() { _ = rs.Unsubscribe() }()
	owner := &wire.MemberRef{NodeId: "n0", Incarnation: 1}
	send := func(to uint64, subscribers ...string) {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Owner: owner, Topic: topic,
			Subscribers: subscribers, Packed: wire.Pack(nil, [][]byte{[]byte("z")}), Count: 1, ToIncarnation: to}}})
		require.NoError(t, err)
		require.NoError(t, raw.PublishRequest("pubsub.node.n1", inbox, data))
	}
	send(inc+1, "ghost-1", "ghost-2", "ghost-3") // a newer incarnation's: unanswered
	send(inc-1, "ghost-4")                       // an older one's: SubscriberGone
	send(inc, "ghost-5", "ghost-6")              // its own: SubscriberGone
	for _, want := range []int{1, 2} {
		select {
		case m := <-replies:
			var env wire.Envelope
			require.NoError(t, proto.Unmarshal(m.Data, &env))
			st := env.GetReply().GetStatuses()
			require.Len(t, st, want, "reply %v (3 statuses: the delivery meant for a newer incarnation was answered)", &env)
			for _, s := range st {
				assert.Equal(t, pubsub.SubscriberGone, pubsub.DeliveryStatus(s))
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no answer with %d statuses", want)
		}
	}
	assert.Len(t, rec.of(sub.ID()), 1, "the real subscriber")
}

// Publishes and subscribes reach both incarnations of a replaced ID after
// the heal too, until the older one stops: the older one served the topics
// it still believed it owned, and a publish served by both was delivered
// twice (TestPublishesRightAfterAReplacedOwnersHealReachSubscribersOnce: 4
// of 5 runs before). A request names the owner's incarnation the sender's
// view holds, and a node stays silent on one meant for a newer
// incarnation of its ID; on its own, or an older one's, it answers.
func TestRequestsForANewerIncarnationGoUnanswered(t *testing.T) {
	c := newCluster(t, 3, 3)
	owned := ownedBy(t, c.Nodes[0], "to-incarnation-req") // a topic n1 does not own
	incOf := func(id string) uint64 { return memberRef(t, c.Nodes[0], id).GetIncarnation() }
	raw := c.Connect(t, 0)

	// Real requests name the owner's incarnation.
	named := make(chan *wire.Envelope, 64)
	tap, err := raw.Subscribe("pubsub.node.n0", func(m *nats.Msg) {
		var env wire.Envelope
		if wire.Decode(m.Data, &env) == nil && (env.GetPublish() != nil || env.GetSubscribe() != nil) {
			select {
			case named <- &env:
			default:
			}
		}
	})
	require.NoError(t, err)
	defer func() { _ = tap.Unsubscribe() }()
	require.NoError(t, raw.Flush())
	subscribe(t, c.Nodes[1], owned, newRecorder().handler)
	_, err = c.Nodes[1].Publish(ctxT(t), owned, msg(0))
	require.NoError(t, err)
	for _, kind := range []string{"subscribe", "publish"} {
		select {
		case env := <-named:
			to := env.GetPublish().GetToIncarnation() + env.GetSubscribe().GetToIncarnation()
			assert.Equal(t, incOf("n0"), to, "a %s request's to_incarnation", kind)
		case <-time.After(5 * time.Second):
			t.Fatalf("the tap saw no %s request to n0", kind)
		}
	}

	// Forged requests to n1 for a topic n0 owns: n1 answers NOT_OWNER at
	// once, unless the request is meant for a newer incarnation of n1.
	replies := make(chan *nats.Msg, 8)
	rs, err := raw.ChanSubscribe("to-inc-reply.*", replies)
	require.NoError(t, err)
	defer func() { _ = rs.Unsubscribe() }()
	from := &wire.MemberRef{NodeId: "n2", Incarnation: incOf("n2")}
	kinds := map[string]func(to uint64) *wire.Envelope{
		"publish": func(to uint64) *wire.Envelope {
			return &wire.Envelope{Body: &wire.Envelope_Publish{Publish: &wire.PublishRequest{From: from, Topic: owned, ToIncarnation: to,
				Packed: wire.Pack(nil, [][]byte{[]byte("z")}), Count: 1}}}
		},
		"subscribe": func(to uint64) *wire.Envelope {
			return &wire.Envelope{Body: &wire.Envelope_Subscribe{Subscribe: &wire.SubscribeRequest{From: from, Topic: owned, ToIncarnation: to,
				Subscriber: "forged-1"}}}
		},
	}
	inc := incOf("n1")
	for name, build := range kinds {
		t.Run(name, func(t *testing.T) {
			for _, to := range []uint64{inc + 1, inc - 1, inc} { // one request after another on one connection, handled in order
				data, err := proto.Marshal(build(to))
				require.NoError(t, err)
				require.NoError(t, raw.PublishRequest("pubsub.node.n1", fmt.Sprintf("to-inc-reply.%d", to), data))
			}
			for _, want := range []uint64{inc - 1, inc} {
				select {
				case m := <-replies:
					require.Equal(t, fmt.Sprintf("to-inc-reply.%d", want), m.Subject, "the request meant for a newer incarnation was answered")
					var env wire.Envelope
					require.NoError(t, proto.Unmarshal(m.Data, &env))
					assert.Equal(t, wire.Reply_NOT_OWNER, env.GetReply().GetCode())
				case <-time.After(5 * time.Second):
					t.Fatalf("no answer to the request meant for incarnation %d", want)
				}
			}
		})
	}
}

// A node whose sends alone were cut (it still heard its peers) is dropped
// past MemberTimeout and replaced under its ID like one cut off both ways,
// but it never dropped its peers. It must stop after the heal all the same
// (guarantee 9). Before the notice's check moved to the peers' side (only
// an incarnation a peer timed out is told; the node checks the peer's
// reported view) it ran on as a zombie, its subscription known to no owner
// and never ended: 3 of 3 runs.
func TestSupersededNodeWhoseSendsAloneWereCutStops(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	older := c.Nodes[2]
	topic := ownedBy(t, c.Nodes[0], "superseded-oneway")
	rec := newRecorder()
	sz := subscribe(t, older, topic, rec.handler)
	c.Client(2).Stall(faultnet.Forward) // n2 hears its peers; they hear nothing from it
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	c.HealAll()
	select {
	case <-sz.Done():
		require.ErrorIs(t, sz.Err(), pubsub.ErrClosed)
	case <-time.After(10 * time.Second):
		t.Fatalf("the older incarnation still runs 10 s after the heal; older view %v, peers' %v, replacement's %v",
			older.Members(), c.Nodes[0].Members(), n2.Members())
	}
}
