package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// heldSyncMember is a member, made of heartbeats, whose answers to sync
// pulls the test holds until release is called. It answers with no
// subscription. Other requests get a plain OK.
type heldSyncMember struct {
	mu       sync.Mutex
	released bool
	held     []*nats.Msg
	asked    chan struct{}
	page     []byte
}

func newHeldSyncMember(t *testing.T, nc *nats.Conn, id string) *heldSyncMember {
	t.Helper()
	page, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_OK,
		Sync: &wire.Sync{From: &wire.MemberRef{NodeId: id, Incarnation: 1}}}}})
	require.NoError(t, err)
	ok, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_OK}}})
	require.NoError(t, err)
	h := &heldSyncMember{asked: make(chan struct{}, 1), page: page}
	sub, err := nc.Subscribe("pubsub.node."+id, func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) != nil || m.Reply == "" {
			return
		}
		if _, isSync := env.Body.(*wire.Envelope_SyncRequest); !isSync {
			_ = m.Respond(ok)
			return
		}
		select {
		case h.asked <- struct{}{}:
		default:
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		if !h.released {
			h.held = append(h.held, m)
			return
		}
		_ = m.Respond(h.page)
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, nc.Flush())
	return h
}

func (h *heldSyncMember) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.released = true
	for _, m := range h.held {
		_ = m.Respond(h.page)
	}
	h.held = nil
}

// Found by review (directRequests fixes it): a subscribe an owner records while the topic is
// not ready yet (its registry waits for a member's sync) lives only in the
// topic actor. When the view changes again by a join before the registry
// completes, reconcile clears the not-ready actor (a.nodes = nil), and the
// registry, which keeps the earlier members' answers across join-only
// changes, holds only what the subscriber's node answered before it
// subscribed. The subscriber's node pushes nothing (the owner did not
// change). The owner then serves the topic without the subscriber: the
// subscribe returned nil, publishes are acked with 0 deliveries and no
// failure, and nothing repairs it while no member vanishes.
func TestSubscribeRecordedWhileNotReadySurvivesAJoin(t *testing.T) {
	c := newCluster(t, 1, 2)
	sub, owner := c.Nodes[0], c.Nodes[1]
	const f1, f2 = "review-fake-1", "review-fake-2"
	var topic string
	for i := 0; ; i++ {
		topic = fmt.Sprintf("review-held-%d", i)
		if pubsub.OwnerForTest(topic, []string{sub.ID(), owner.ID(), f1, f2}) == owner.ID() {
			break
		}
	}
	nc := c.Connect(t, 0)
	t.Cleanup(nc.Close)
	m1 := newHeldSyncMember(t, nc, f1)
	m2 := newHeldSyncMember(t, nc, f2)

	// 1. f1 joins (by heartbeat): the owner asks it for its subscriptions,
	// and the answer is held. Every fresh actor on the owner is not ready.
	stop1 := heartbeatAs(nc, f1)
	t.Cleanup(stop1)
	for _, n := range c.Nodes {
		require.NoError(t, n.WaitMembers(ctxT(t), 3))
	}
	select {
	case <-m1.asked:
	case <-time.After(10 * time.Second):
		t.Fatal("nobody asked f1 for its subscriptions")
	}

	// 2. A subscribe reaches the owner while the topic is not ready: it is
	// recorded (the owner answers OK) in the actor alone.
	got := make(chan struct{}, 16)
	subscribe(t, sub, topic, func(_ context.Context, _ *pubsub.Message) error {
		got <- struct{}{}
		return nil
	})

	// 3. f2 joins before f1 answers: a join-only view change.
	stop2 := heartbeatAs(nc, f2)
	t.Cleanup(stop2)
	for _, n := range c.Nodes {
		require.NoError(t, n.WaitMembers(ctxT(t), 4)) // taken under members.mu: the registry was reset too
	}

	// 4. The fakes answer (no subscriptions): the owner's registry completes.
	m1.release()
	m2.release()

	// 5. The topic is served; the subscription must get what is published.
	var ack pubsub.PublishAck
	require.Eventually(t, func() bool {
		var err error
		ack, err = sub.Publish(ctxT(t), topic, []byte("x"))
		return err == nil
	}, 15*time.Second, 10*time.Millisecond, "the owner never served the topic")
	require.Eventually(t, func() bool {
		a, err := sub.Publish(ctxT(t), topic, []byte("x"))
		if err == nil {
			ack = a
		}
		return err == nil && a.Delivered == 1
	}, 4*time.Second, 20*time.Millisecond,
		"the owner serves the topic without the live subscription (subscribe returned nil): last ack %+v", ack)
	select {
	case <-got:
	default:
		t.Fatal("the subscription got nothing")
	}
}

// joinAs announces id with a JOIN (so peers do not take it for a member
// that ran without them), then heartbeats as id until stopped.
func joinAs(nc *nats.Conn, id string) (stop func()) {
	_ = nc.Publish("pubsub.members", heartbeat(wire.Heartbeat_JOIN, id, 1, 0))
	return heartbeatAs(nc, id)
}

// Found by review (directRequests fixes it): the registry's answers are snapshots of a node's
// subscriptions, merged into the owner's actor when the registry
// completes (take), possibly long after they were given. An Unsubscribe
// that reaches the owner in between removes the subscriber from the actor,
// and the snapshot then adds it back: the owner delivers to a subscription
// that no longer exists, and the next publish's ack reports a failure
// (SubscriberGone) for a subscriber that unsubscribed cleanly (and an
// eviction event for it). Here a member vanishing (f2 times out) makes the
// owner ask every member again; the subscriber's node answers before
// unsubscribing, and the registry completes only after the unsubscribe
// (f1's answer is held).
func TestUnsubscribeIsNotUndoneByAnOlderSyncAnswer(t *testing.T) {
	c := newCluster(t, 1, 2)
	subNode, owner := c.Nodes[0], c.Nodes[1]
	const f1, f2 = "review-fake-1", "review-fake-2"
	all := []string{subNode.ID(), owner.ID(), f1, f2}
	var topics []string
	for i := 0; len(topics) < 2; i++ {
		if tp := fmt.Sprintf("review-unsub-%d", i); pubsub.OwnerForTest(tp, all) == owner.ID() {
			topics = append(topics, tp)
		}
	}
	topic, probe := topics[0], topics[1]
	s := subscribe(t, subNode, topic, func(context.Context, *pubsub.Message) error { return nil })
	ack, err := subNode.Publish(ctxT(t), topic, []byte("before"))
	mustAccept(t, ack, err, 1)

	nc := c.Connect(t, 0)
	t.Cleanup(nc.Close)
	// The subscriber node's sync answers, as they travel to the owner.
	answered := make(chan struct{}, 1)
	spy, err := nc.Subscribe("_INBOX.>", func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) != nil {
			return
		}
		sy := env.GetReply().GetSync()
		if sy.GetFrom().GetNodeId() != subNode.ID() {
			return
		}
		for _, ts := range sy.GetTopics() {
			if ts.GetTopic() == topic {
				select {
				case answered <- struct{}{}:
				default:
				}
			}
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = spy.Unsubscribe() })
	m1 := newHeldSyncMember(t, nc, f1)
	m2 := newHeldSyncMember(t, nc, f2)
	m2.release()
	stop1 := joinAs(nc, f1)
	t.Cleanup(stop1)
	stop2 := joinAs(nc, f2)
	for _, n := range c.Nodes {
		require.NoError(t, n.WaitMembers(ctxT(t), 4))
	}
	// f2 vanishes: every member is asked again; f1's answer stays held.
	stop2()
	select {
	case <-answered:
	case <-time.After(15 * time.Second):
		t.Fatal("the subscriber's node was never asked again")
	}
	require.NoError(t, s.Unsubscribe(ctxT(t)))
	m1.release()
	// The owner's registry is complete once a fresh topic of it is served.
	require.Eventually(t, func() bool {
		_, err := subNode.Publish(ctxT(t), probe, []byte("probe"))
		return err == nil
	}, 15*time.Second, 10*time.Millisecond, "the owner never completed its registry")
	ack, err = subNode.Publish(ctxT(t), topic, []byte("after"))
	require.NoError(t, err)
	require.Empty(t, ack.Failures, "the unsubscribed subscriber was put back at the owner: ack %+v", ack)
}
