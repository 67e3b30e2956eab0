package pubsub_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// eventLog records a node's events.
type eventLog struct {
	mu     sync.Mutex
	events []pubsub.Event
}

func watch(t *testing.T, n *pubsub.Node) *eventLog {
	l := &eventLog{}
	cancel := n.Events().Subscribe(func(e pubsub.Event) {
		l.mu.Lock()
		l.events = append(l.events, e)
		l.mu.Unlock()
	})
	t.Cleanup(cancel)
	return l
}

// find waits for the first event of type E matching ok.
func find[E pubsub.Event](t *testing.T, l *eventLog, ok func(E) bool) E {
	t.Helper()
	var found E
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, e := range l.events {
			if x, is := e.(E); is && ok(x) {
				found = x
				return true
			}
		}
		return false
	}, "no %T event arrived", found)
	return found
}

func TestEventsOfPublishAndDelivery(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithEvictAfter(2))
	ctx := ctxT(t)
	topic := ownedBy(t, c.Nodes[0], "ev")
	owner, subNode, publisher := watch(t, c.Nodes[0]), watch(t, c.Nodes[1]), watch(t, c.Nodes[2])
	good := subscribe(t, c.Nodes[1], topic, newRecorder().handler)
	bad := subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error { return errors.New("no") })

	added := find(t, owner, func(e pubsub.SubscriberAdded) bool { return e.Subscriber == good.ID() })
	if added.Topic != topic || added.Node != c.Nodes[0].ID() || added.Time.IsZero() {
		t.Errorf("SubscriberAdded = %+v", added)
	}
	_, err := c.Nodes[2].PublishBatch(ctx, topic, [][]byte{[]byte("a"), []byte("b")})
	require.NoError(t, err)
	acc := find(t, owner, func(e pubsub.PublishAccepted) bool { return e.Topic == topic })
	if acc.Messages != 2 || acc.Delivered != 1 || acc.Failed != 1 {
		t.Errorf("PublishAccepted = %+v, want 2 messages, 1 delivered, 1 failed", acc)
	}
	ok := find(t, owner, func(e pubsub.DeliverySucceeded) bool { return e.Topic == topic })
	if ok.Subscribers != 1 || ok.Messages != 2 {
		t.Errorf("DeliverySucceeded = %+v", ok)
	}
	failed := find(t, owner, func(e pubsub.DeliveryFailed) bool { return e.Topic == topic })
	if failed.Subscriber != bad.ID() || failed.Status != pubsub.HandlerError {
		t.Errorf("DeliveryFailed = %+v, want %s handler-error", failed, bad.ID())
	}
	// A second failure evicts (EvictAfter 2): both the owner and the
	// subscriber's node say so.
	_, err = c.Nodes[2].Publish(ctx, topic, []byte("c"))
	require.NoError(t, err)
	for _, l := range []*eventLog{owner, subNode} {
		ev := find(t, l, func(e pubsub.SubscriberEvicted) bool { return e.Subscriber == bad.ID() })
		if ev.Status != pubsub.HandlerError || ev.Topic != topic {
			t.Errorf("SubscriberEvicted = %+v", ev)
		}
	}
	require.NoError(t, good.Unsubscribe(ctx))
	rm := find(t, owner, func(e pubsub.SubscriberRemoved) bool { return e.Subscriber == good.ID() })
	if rm.Topic != topic {
		t.Errorf("SubscriberRemoved = %+v", rm)
	}
	// Rejected on the publisher when the owner is never reached.
	_, err = c.Nodes[2].Publish(ctx, "bad topic", []byte("x"))
	require.Error(t, err, "invalid topic accepted")
	rej := find(t, publisher, func(e pubsub.PublishRejected) bool { return e.Topic == "bad topic" })
	if rej.Reason != pubsub.ReasonInvalidTopic || rej.Node != c.Nodes[2].ID() {
		t.Errorf("PublishRejected = %+v", rej)
	}
}

func TestEventsOfMembershipAndOwnership(t *testing.T) {
	c := newCluster(t, 3, 2)
	l0 := watch(t, c.Nodes[0])
	c.AddNode(t, "n2", 2, fast...)
	joined := find(t, l0, func(e pubsub.MemberJoined) bool { return e.Member.ID == "n2" })
	if joined.Members != 3 || joined.Node != c.Nodes[0].ID() {
		t.Errorf("MemberJoined = %+v", joined)
	}
	c.WaitConverged(t, 5*time.Second)
	// A topic n0 owns among the three: it moves when n0 leaves.
	topic := ownedBy(t, c.Nodes[0], "own")
	subscribe(t, c.Nodes[1], topic, newRecorder().handler)
	l1, l2 := watch(t, c.Nodes[1]), watch(t, c.Nodes[2])
	c.CloseNode(t, 0)
	left := find(t, l1, func(e pubsub.MemberLeft) bool { return e.Member.ID == c.Nodes[0].ID() })
	if left.Members != 2 {
		t.Errorf("MemberLeft = %+v", left)
	}
	// The topic the closed node owned moves; its new owner reports the change.
	c.WaitConverged(t, 5*time.Second)
	publishUntilAccepted(t, c.Nodes[1], topic, []byte("x"), 1, 5*time.Second)
	newOwner, _ := c.Nodes[1].OwnerOf(topic)
	lNew := map[string]*eventLog{"n1": l1, "n2": l2}[newOwner.ID]
	chg := find(t, lNew, func(e pubsub.TopicOwnerChanged) bool { return e.Topic == topic })
	if chg.OldOwner != c.Nodes[0].ID() || chg.NewOwner != newOwner.ID || chg.Node != newOwner.ID {
		t.Errorf("TopicOwnerChanged = %+v, want %s -> %s", chg, c.Nodes[0].ID(), newOwner.ID)
	}
}

func TestMetricsSnapshotAndStats(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithMetricsInterval(50*time.Millisecond))
	n := c.Nodes[0]
	l := watch(t, n)
	subscribe(t, n, "m", newRecorder().handler)
	ack, err := n.Publish(ctxT(t), "m", []byte("x"))
	mustAccept(t, ack, err, 1)
	snap := find(t, l, func(e pubsub.MetricsSnapshot) bool { return e.Stats.Deliveries >= 1 })
	st := snap.Stats
	if st.Members != 1 || st.TopicsOwned != 1 || st.Subscriptions != 1 || st.Subscribers["m"] != 1 || st.Deliveries < 1 {
		t.Errorf("snapshot stats = %+v", st)
	}
}

func TestTopicStatsAgreesWithSubscriptions(t *testing.T) {
	c := newCluster(t, 3, 3)
	want := map[string]int{"n0": 1, "n1": 2, "n2": 3}
	for i, n := range c.Nodes {
		for j := 0; j <= i; j++ {
			subscribe(t, n, "counted", newRecorder().handler)
		}
	}
	for _, n := range c.Nodes {
		ts, err := n.TopicStats(ctxT(t), "counted")
		require.NoError(t, err)
		owner, _ := n.OwnerOf("counted")
		require.Equal(t, 6, ts.Total, "TopicStats from %s: total", n.ID())
		require.Equal(t, owner.ID, ts.Owner, "TopicStats from %s: owner", n.ID())
		require.Equal(t, want, ts.Subscribers, "TopicStats from %s: subscribers per node", n.ID())
	}
}

func TestBlockedListenerDoesNotSlowPublishing(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	release := make(chan struct{})
	var mu sync.Mutex
	var dropped uint64
	seenDropped := make(chan struct{})
	blocked := make(chan struct{})
	first := true
	cancel := n.Events().Subscribe(func(e pubsub.Event) {
		if first {
			first = false
			close(blocked)
			<-release
		}
		if d, ok := e.(pubsub.EventsDropped); ok {
			mu.Lock()
			dropped += d.Dropped
			mu.Unlock()
			close(seenDropped)
		}
	})
	defer cancel()
	subscribe(t, n, "busy", newRecorder().handler)
	<-blocked // the listener holds the SubscriberAdded event and is stuck
	ctx := ctxT(t)
	// Each publish emits 2 events (accepted, succeeded); far more than the
	// listener's buffer while it is stuck.
	const publishes = pubsub.EventBufferSize
	for i := 0; i < publishes; i++ {
		ack, err := n.Publish(ctx, "busy", msg(i))
		mustAccept(t, ack, err, 1)
	}
	close(release)
	select {
	case <-seenDropped:
	case <-time.After(5 * time.Second):
		t.Fatal("no EventsDropped after the listener fell behind")
	}
	mu.Lock()
	defer mu.Unlock()
	// 2 events per publish were emitted while the listener was stuck; its
	// buffer took EventBufferSize of them.
	require.Equal(t, uint64(2*publishes-pubsub.EventBufferSize), dropped, "events counted by EventsDropped")
}
