package pubsub_test

import (
	"fmt"
	"sync/atomic"
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

// A node holds a bounded number of subscriptions of its own: past it,
// Subscribe fails at once with ErrTooManySubscriptions, and succeeds
// again once one is closed.
func TestSubscriptionsPerNodeAreBounded(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	n.LimitSubscriptionsForTest(3)
	var subs []*pubsub.Subscription
	for i := range 3 {
		subs = append(subs, subscribe(t, n, fmt.Sprintf("bounded-%d", i), newRecorder().handler))
	}
	_, err := n.Subscribe(ctxT(t), "bounded-3", newRecorder().handler)
	require.ErrorIs(t, err, pubsub.ErrTooManySubscriptions)
	assert.Contains(t, err.Error(), "holds 3")

	require.NoError(t, subs[0].Unsubscribe(ctxT(t)))
	subscribe(t, n, "bounded-3", newRecorder().handler)
}

// An owner holds a bounded number of subscriber records over all its
// topics: past it, a subscribe request is refused (NOT_READY, with the
// reason), counted in RequestsRefused, and the subscriber's Subscribe ends
// with ErrTopicUnavailable saying why. The records it holds keep being
// served, and room made by an unsubscribe is used again.
func TestOwnerSubscriberRecordsAreBounded(t *testing.T) {
	c := newCluster(t, 3, 3)
	owner, sub := c.Nodes[1], c.Nodes[2]
	topic := ownedBy(t, owner, "records")
	other := ownedBy(t, owner, "records-other")
	owner.LimitOwnerRecordsForTest(2)
	rec := newRecorder()
	first := subscribe(t, sub, topic, rec.handler)
	subscribe(t, c.Nodes[0], other, rec.handler)
	require.Equal(t, int64(2), owner.OwnerRecordsForTest())

	before := owner.Stats().RequestsRefused
	// Refused until the node's RequestTimeout (3 s here): a shorter ctx
	// could end during an ask in flight, an outcome the node cannot know.
	_, err := sub.Subscribe(ctxT(t), topic, rec.handler)
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	assert.Contains(t, err.Error(), "subscriber records")
	assert.Greater(t, owner.Stats().RequestsRefused, before)

	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, [][]byte{msg(1)})
	mustAccept(t, ack, err, 1)
	assert.Equal(t, []string{string(msg(1))}, rec.of(first.ID()), "the record it holds is served")

	require.NoError(t, first.Unsubscribe(ctxT(t)))
	testcluster.WaitFor(t, 5*time.Second, func() bool { return owner.OwnerRecordsForTest() == 1 },
		"the owner holds %d records after the unsubscribe", owner.OwnerRecordsForTest())
	again := subscribe(t, sub, topic, rec.handler)
	ack, err = c.Nodes[0].PublishBatch(ctxT(t), topic, [][]byte{msg(2)})
	mustAccept(t, ack, err, 1)
	assert.Equal(t, []string{string(msg(2))}, rec.of(again.ID()))
}

// A member answering a sync pull with page after page, each advancing,
// past what a node may hold: the puller stops, keeps the pages before and
// counts it Malformed, instead of growing its list for as long as the
// member answers. The node keeps serving.
func TestSyncPullStopsPastWhatANodeMayHold(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	n.LimitSubscriptionsForTest(50)
	nc := c.Connect(t, 0)
	t.Cleanup(nc.Close)
	var pages atomic.Int64
	// Every answer is a new page after the last, ten subscribers long,
	// with more to come.
	s, err := nc.Subscribe("pubsub.node.zz-pager", func(m *nats.Msg) {
		k := pages.Add(1)
		subs := make([]string, 10)
		for i := range subs {
			subs[i] = fmt.Sprintf("s%02d", i)
		}
		page, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_OK, Sync: &wire.Sync{
			From: &wire.MemberRef{NodeId: "zz-pager", Incarnation: 1}, More: true,
			Topics: []*wire.TopicSubscribers{{Topic: fmt.Sprintf("page-%08d", k), Subscribers: subs}},
		}}}})
		if err == nil {
			_ = m.Respond(page)
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Unsubscribe() })
	require.NoError(t, nc.Flush())
	t.Cleanup(heartbeatAs(nc, "zz-pager"))

	testcluster.WaitFor(t, 5*time.Second, func() bool { return n.Stats().Malformed > 0 },
		"the pull never stopped (%d pages asked for)", pages.Load())
	assert.GreaterOrEqual(t, pages.Load(), int64(6), "stopped before the pages passed 50 subscribers")
	servesEveryone(t, c, 3*time.Second)
	assert.Equal(t, uint64(1), n.Stats().Malformed)
}

// A topic that moves to an owner already at its bound of subscriber
// records (its old owner left) brings only what fits: the new owner takes
// records from its members' syncs up to the bound, counts the rest in
// RequestsRefused, and serves the ones it holds.
func TestMovedTopicTakesSubscriberRecordsUpToTheBound(t *testing.T) {
	c := newCluster(t, 3, 3)
	for _, n := range c.Nodes {
		n.LimitOwnerRecordsForTest(2)
	}
	moving := ownedBy(t, c.Nodes[1], "records-moving")
	rec := newRecorder()
	// One record on each node that stays, on a topic it owns.
	subscribe(t, c.Nodes[2], ownedBy(t, c.Nodes[0], "records-kept"), rec.handler)
	subscribe(t, c.Nodes[0], ownedBy(t, c.Nodes[2], "records-kept"), rec.handler)
	// Two on the topic that moves, from the nodes that stay.
	subs := []*pubsub.Subscription{
		subscribe(t, c.Nodes[0], moving, rec.handler),
		subscribe(t, c.Nodes[2], moving, rec.handler),
	}
	before := c.Nodes[0].Stats().RequestsRefused + c.Nodes[2].Stats().RequestsRefused

	c.CloseNode(t, 1)
	c.WaitConverged(t, 10*time.Second, 0, 2)
	owner, err := c.Nodes[0].OwnerOf(moving)
	require.NoError(t, err)
	to := c.Nodes[0]
	if owner.ID == c.Nodes[2].ID() {
		to = c.Nodes[2]
	}
	var ack pubsub.PublishAck
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		ack, err = c.Nodes[0].PublishBatch(ctxT(t), moving, [][]byte{msg(1)})
		return err == nil && ack.Status == pubsub.Accepted
	}, "the moved topic is not served: %v", err)
	assert.Equal(t, 1, ack.Delivered, "the one record that fit")
	assert.Equal(t, int64(2), to.OwnerRecordsForTest())
	sum := 0
	for _, n := range to.Stats().Subscribers {
		sum += n
	}
	assert.Equal(t, int64(sum), to.OwnerRecordsForTest(), "records against the topics' subscribers")
	after := c.Nodes[0].Stats().RequestsRefused + c.Nodes[2].Stats().RequestsRefused
	assert.Greater(t, after, before, "the record that did not fit is counted")
	got := len(rec.of(subs[0].ID())) + len(rec.of(subs[1].ID()))
	assert.Equal(t, 1, got, "deliveries to the moved topic's subscribers")
}

// An owner at its bound of subscriber records that is offered again the
// records it holds (a member crashed: every member is asked again for its
// subscriptions) keeps them without counting or logging a refusal, and its
// count of records stays the sum of its topics' subscribers.
func TestRecordsOfferedAgainAtTheBoundAreNotRefused(t *testing.T) {
	c := newCluster(t, 3, 3)
	owner := c.Nodes[1]
	topics := []string{ownedBy(t, owner, "records-again-a"), ownedBy(t, owner, "records-again-b")}
	owner.LimitOwnerRecordsForTest(2)
	rec := newRecorder()
	var subs []*pubsub.Subscription
	for _, topic := range topics {
		subs = append(subs, subscribe(t, c.Nodes[2], topic, rec.handler))
	}
	before := owner.Stats()
	require.Equal(t, int64(2), owner.OwnerRecordsForTest())

	c.Crash(0)
	c.WaitConverged(t, 10*time.Second, 1, 2)
	for i, topic := range topics {
		var ack pubsub.PublishAck
		var err error
		testcluster.WaitFor(t, 10*time.Second, func() bool {
			ack, err = c.Nodes[2].PublishBatch(ctxT(t), topic, [][]byte{msg(i)})
			return err == nil && ack.Status == pubsub.Accepted
		}, "%s is not served: %v", topic, err)
		assert.Equal(t, 1, ack.Delivered, "%s", topic)
		assert.Equal(t, []string{string(msg(i))}, rec.of(subs[i].ID()))
	}
	after := owner.Stats()
	assert.Equal(t, before.RequestsRefused, after.RequestsRefused, "refusals counted for records the owner held")
	sum := 0
	for _, n := range after.Subscribers {
		sum += n
	}
	assert.Equal(t, int64(sum), owner.OwnerRecordsForTest(), "records against the topics' subscribers")
	assert.Equal(t, int64(2), owner.OwnerRecordsForTest())
}
