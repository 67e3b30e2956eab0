package pubsub

import (
	"context"
	"fmt"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// registryNodeForTest is a Node with no connection, for the owner's sync
// registry and topic actors alone: members[0] is itself, and its view
// (epoch 1) holds members. It ends with the test.
func registryNodeForTest(t *testing.T, members ...Member) (*Node, *view) {
	n := &Node{self: members[0], log: nodeLogger{Logger: slog.New(slog.DiscardHandler)}}
	n.life.ctx, n.life.cancel = context.WithCancel(t.Context())
	t.Cleanup(n.life.cancel)
	n.events = newEventStream(n.self.ID)
	v := newView(1, members)
	n.members.views.cur.Store(v)
	n.members.views.history.remember(v)
	n.owner.init(n)
	return n, v
}

// Regression (review): a topic actor busy through more views than the
// bounded view history keeps (here a scale-down by 10 graceful leaves)
// could not prove it owned its topic throughout, cleared its state and
// rebuilt it from the registry, which after graceful leaves held only the
// leavers' handovers: it came back ready without member b's subscriber.
// Now it asks every member again (syncRegistry.resync) and is ready only
// once they answered, with b's subscriber.
func TestActorAsleepPastTheHistoryResyncs(t *testing.T) {
	ms := []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}}
	for i := range 10 {
		ms = append(ms, Member{ID: fmt.Sprintf("d%02d", i), Incarnation: uint64(10 + i)})
	}
	n, v := registryNodeForTest(t, ms...)
	topic := ownedTopics(n, "a", "t", 1)[0]
	bSubs := []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{"x"}}}
	for _, m := range ms[1:] {
		var ts []*wire.TopicSubscribers
		if m.ID == "b" {
			ts = bSubs
		}
		n.owner.registry.applyPulled(v, m, ts, 0)
	}
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	a := n.owner.actor(topic)
	require.True(t, a.ready)
	require.Len(t, a.nodes["b"].set, 1)

	release := make(chan struct{})
	n.owner.onActor(topic, false, func(*topicActor) { <-release }) // busy actor
	cur := ms
	var last *view
	for i := range 10 {
		leaver := cur[len(cur)-1]
		cur = cur[:len(cur)-1]
		last = newView(uint64(i+2), append([]Member(nil), cur...))
		n.members.mu.Lock()
		n.members.views.cur.Store(last)
		n.members.views.history.remember(last)
		n.owner.registry.reset(last, nil, 0, viewChange{leavers: []Member{leaver}})
		n.members.mu.Unlock()
		n.owner.registry.applyHandover(last, leaver.ID, nil)
	}
	require.Less(t, len(n.members.views.history.views), 10, "the history no longer reaches the actor's view")
	close(release)
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	reconciled := func() (ready bool, subs int) {
		done := make(chan struct{})
		n.owner.onActor(topic, false, func(a *topicActor) {
			a.reconcile()
			ready = a.ready
			if ns := a.nodes["b"]; ns != nil {
				subs = len(ns.set)
			}
			close(done)
		})
		<-done
		return ready, subs
	}
	ready, _ := reconciled()
	require.False(t, ready, "ready before the members answered again")
	n.owner.registry.applyPulled(last, Member{ID: "b", Incarnation: 2}, bSubs, 0) // b answers the resync
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	ready, subs := reconciled()
	require.True(t, ready)
	require.Equal(t, 1, subs, "b's subscriber survived a scale-down its actor slept through")
}

// A resync's answers reach the actors that took their view's syncs before
// it too: they stayed pending in the registry until the next view change
// (whose take merged them, older than what the actors applied since), and
// every subscribe request meanwhile was held for them (found by review).
func TestResyncIsMergedIntoActorsSyncedBeforeIt(t *testing.T) {
	b := Member{ID: "b", Incarnation: 2}
	n, v := registryNodeForTest(t, Member{ID: "a", Incarnation: 1}, b)
	topic := ownedTopics(n, "a", "t", 1)[0]
	n.owner.registry.applyPulled(v, b, nil, 0)
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	subs := func() int {
		done := make(chan int)
		n.owner.onActor(topic, false, func(a *topicActor) {
			a.reconcile()
			require.True(t, a.ready)
			k := 0
			if ns := a.nodes["b"]; ns != nil {
				k = len(ns.set)
			}
			done <- k
		})
		return <-done
	}
	require.Zero(t, subs(), "synced with b's empty answer")

	_, before := n.owner.registry.completeGen()
	n.owner.registry.resync(v)
	_, resynced := n.owner.registry.completeGen()
	n.owner.registry.applyPulled(v, b, []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{"x"}}}, 0)
	complete, after := n.owner.registry.completeGen()
	require.True(t, complete)
	// A leaver's handover list built in between must be built again.
	require.Greater(t, resynced, before, "a resync left the registry's generation")
	require.Greater(t, after, resynced, "a completion (with a topic now pending) left the registry's generation")
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	require.Equal(t, 1, subs(), "the resync's answer was not merged into the actor")
	require.False(t, n.owner.registry.hasPending(topic), "the resync's answer still pending")
}

// An eviction while the registry collects answers is held for them: the
// owner evicts before the subscriber's node hears of it, so an answer
// given meanwhile still lists the subscriber, and took it back (found by
// review).
func TestEvictionDuringASyncOutlivesOlderAnswers(t *testing.T) {
	b, c := Member{ID: "b", Incarnation: 2}, Member{ID: "c", Incarnation: 3}
	n, v := registryNodeForTest(t, Member{ID: "a", Incarnation: 1}, b, c)
	topic := ownedTopics(n, "a", "t", 1)[0]
	x := SubscriberID{Node: "b", Local: "x"}
	// holdsX runs f on the topic's actor, then reports whether it holds x
	// (and, with ready, whether it is ready).
	holdsX := func(f func(a *topicActor)) (holds, ready bool) {
		done := make(chan struct{})
		n.owner.onActor(topic, false, func(a *topicActor) {
			defer close(done)
			f(a)
			if ns := a.nodes["b"]; ns != nil {
				_, holds = ns.set["x"]
			}
			ready = a.ready
		})
		<-done
		return holds, ready
	}
	// b's subscribe reaches the actor before the registry is complete (c
	// has not answered); b answers listing x; the owner evicts x.
	holds, _ := holdsX(func(a *topicActor) {
		a.subscribe(&wire.MemberRef{NodeId: "b", Incarnation: 2}, "x", false, func(ownerAnswer) {})
	})
	require.True(t, holds)
	n.owner.registry.applyPulled(v, b, []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{"x"}}}, n.owner.registry.stamp())
	holds, _ = holdsX(func(a *topicActor) { a.account([]subscriberOutcome{{id: x, status: SubscriberGone}}) })
	require.False(t, holds, "not evicted")
	n.owner.registry.applyPulled(v, c, nil, 0) // complete: the actor takes b's answer
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	holds, ready := holdsX(func(a *topicActor) { a.reconcile() })
	require.True(t, ready)
	require.False(t, holds, "b's answer brought the evicted subscriber back")
}
