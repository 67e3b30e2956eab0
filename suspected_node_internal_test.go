package pubsub

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Regression (TestSoakKeepMajorityProducers/flap/accepted, about one run
// in ten): a batch's report from a node that had left the owner's view
// (its delivery swept, SubscriberGone) evicted that node's subscriber when
// the batch's last report came in, after the node was back in the view
// (a false suspicion) and its subscriber re-registered by sync. The node
// still held the subscription and nothing registered it again: it stopped
// receiving without being told. A departed node's subscribers are dropped
// by reconcile, for the view they are gone from, not by a batch's
// outcomes, which can come in views later.
func TestGoneFromTheViewDoesNotEvictAfterTheNodeIsBack(t *testing.T) {
	n := &Node{self: Member{ID: "a", Incarnation: 1}}
	n.life.ctx, n.life.cancel = context.WithCancel(t.Context())
	defer n.life.cancel()
	n.events = newEventStream(n.self.ID)
	a, b, c := n.self, Member{ID: "b", Incarnation: 2}, Member{ID: "c", Incarnation: 3}
	install := func(epoch uint64, change viewChange, ms ...Member) *view {
		v := newView(epoch, ms)
		n.members.mu.Lock()
		n.members.views.cur.Store(v)
		n.members.views.history.remember(v)
		n.owner.registry.reset(v, nil, 0, change)
		n.members.mu.Unlock()
		return v
	}
	v1 := newView(1, []Member{a, b, c})
	n.members.views.cur.Store(v1)
	n.members.views.history.remember(v1)
	n.owner.init(n)
	topic := ownedTopics(n, "a", "t", 1)[0]
	subsOf := func(local string) []*wire.TopicSubscribers {
		return []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{local}}}
	}
	n.owner.registry.applyPulled(v1, b, subsOf("x"), 0)
	n.owner.registry.applyPulled(v1, c, subsOf("y"), 0)
	reconciled := func() (ready bool, subs map[string]int) {
		done := make(chan struct{})
		n.owner.onActor(topic, false, func(a *topicActor) {
			a.reconcile()
			ready, subs = a.ready, map[string]int{}
			for node, ns := range a.nodes {
				subs[node] = len(ns.set)
			}
			close(done)
		})
		<-done
		return ready, subs
	}
	ready, subs := reconciled()
	require.True(t, ready)
	require.Equal(t, map[string]int{"b": 1, "c": 1}, subs)

	// A batch to b and c, accepted in v1, as publish starts it.
	act := n.owner.actor(topic)
	batch := &pendingBatch{a: act, answer: func(ownerAnswer) {}, remaining: 2}
	n.owner.onActor(topic, false, func(a *topicActor) { a.inflight++; n.owner.inflight.Add(1) })
	// b is suspected and leaves the view; its delivery is swept.
	install(2, viewChange{lost: true}, a, c)
	st, processed, path := remoteStatuses(n, "b", 1, nil, fmt.Errorf("%w: peer left the cluster", ErrTimeout))
	require.Equal(t, []DeliveryStatus{SubscriberGone}, st)
	batch.report(nodeTarget{node: "b", locals: []string{"x"}}, st, processed, path, nil)
	// b is back, in the same incarnation: the members answer the sync again.
	v3 := install(3, viewChange{}, a, b, c)
	n.owner.registry.applyPulled(v3, b, subsOf("x"), 0)
	n.owner.registry.applyPulled(v3, c, subsOf("y"), 0)
	ready, subs = reconciled()
	require.True(t, ready)
	require.Equal(t, map[string]int{"b": 1, "c": 1}, subs, "b re-registered")
	// c's report, late (a slow subscriber, or a route that stalled), ends
	// the batch.
	batch.report(nodeTarget{node: "c", locals: []string{"y"}}, []DeliveryStatus{Delivered}, nil, false, nil)
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	_, subs = reconciled()
	require.Equal(t, map[string]int{"b": 1, "c": 1}, subs, "b's live subscriber evicted by a report from before it came back")
}
