package pubsub

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// oneNodeForTest joins node "a" alone to a server of its own; both end
// with the test.
func oneNodeForTest(t *testing.T) (*Node, context.Context) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() }) // after the node's Close
	return joinForTest(t, s.ClientURL(), "a", 50*time.Millisecond), t.Context()
}

// A copy of an owner's batch that the subscription answered without
// running it (an older batch of its producer: OutOfOrder) is answered
// with that outcome again, not with the outcome of the batch before it:
// handle moved the owner's mark to the batch but left the last status
// behind, so an at-least-once re-send of the dropped batch was reported
// Delivered (found by review).
func TestCopyOfABatchDroppedForItsProducerOrderKeepsItsOutcome(t *testing.T) {
	a, ctx := oneNodeForTest(t)
	var calls atomic.Int32
	sub, err := a.Subscribe(ctx, "t", func(context.Context, *Message) error { calls.Add(1); return nil })
	require.NoError(t, err)
	deliver := func(ownerSeq, producerSeq uint64) DeliveryStatus {
		msgs := payload{msgs: msgBatch{data: [][]byte{[]byte("x")}}, seq: batchSeq{owner: "o", inc: 1, seq: ownerSeq},
			origin: batchOrigin{producer: "p", seq: producerSeq << 16}}
		done := make(chan []DeliveryStatus, 1)
		a.deliver("t", []string{sub.ID().Local}, nil, msgs, func(st []DeliveryStatus, _, _ []uint32) { done <- st })
		return (<-done)[0]
	}
	require.Equal(t, Delivered, deliver(41, 5), "the producer's batch 5")
	assert.Equal(t, OutOfOrder, deliver(42, 3), "the producer's older batch 3, after 5")
	assert.Equal(t, OutOfOrder, deliver(42, 3), "a copy of the owner's batch 42 (the producer's 3)")
	assert.Equal(t, int32(1), calls.Load(), "handler runs")
}

// subscribeTwice subscribes a on topic twice, with handlers that do
// nothing: one subscription the test keeps, one it ends.
func subscribeTwice(t *testing.T, a *Node, topic string) (keep, gone *Subscription) {
	h := func(context.Context, *Message) error { return nil }
	keep, err := a.Subscribe(t.Context(), topic, h)
	require.NoError(t, err)
	gone, err = a.Subscribe(t.Context(), topic, h)
	require.NoError(t, err)
	return keep, gone
}

// A pushed sync's retry names only the subscriptions still held: sent as
// first built after an Unsubscribe, it added the subscriber back at the
// owner, whose next publish then listed it SubscriberGone (found by
// review).
func TestPushRetryLeavesOutUnsubscribed(t *testing.T) {
	a, ctx := oneNodeForTest(t)
	keep, gone := subscribeTwice(t, a, "t")
	other, err := a.Subscribe(ctx, "u", func(context.Context, *Message) error { return nil })
	require.NoError(t, err)
	pushed := []*wire.TopicSubscribers{
		{Topic: "t", Subscribers: []string{keep.ID().Local, gone.ID().Local}},
		{Topic: "u", Subscribers: []string{other.ID().Local}},
		{Topic: "v", Subscribers: []string{keep.ID().Local}}, // not its topic
	}
	require.NoError(t, gone.Unsubscribe(ctx))
	require.NoError(t, other.Unsubscribe(ctx))
	held := a.subscriber.stillHeld(pushed)
	require.Len(t, held, 1)
	assert.Equal(t, "t", held[0].GetTopic())
	assert.Equal(t, []string{keep.ID().Local}, held[0].GetSubscribers())
}

// The same through pushSync itself: an owner that answers the first push
// NOT_READY gets a retry without the subscription unsubscribed meanwhile.
func TestPushSyncRetrySendsOnlyHeldSubscriptions(t *testing.T) {
	a, _ := oneNodeForTest(t)
	keep, gone := subscribeTwice(t, a, "t")

	// A fake owner's inbox, answered by the test.
	nc, err := nats.Connect(a.nc.ConnectedUrl())
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	asks, err := nc.SubscribeSync("test.owner")
	require.NoError(t, err)
	require.NoError(t, nc.Flush())
	answer := func(m *nats.Msg, code wire.Reply_Code) {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: code}}})
		require.NoError(t, err)
		require.NoError(t, m.Respond(data))
	}
	pushed := func(m *nats.Msg) []string {
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(m.Data, &env))
		var locals []string
		for _, ts := range env.GetSync().GetTopics() {
			locals = append(locals, ts.GetSubscribers()...)
		}
		return locals
	}

	first := &wire.Sync{From: a.selfRef(), Topics: []*wire.TopicSubscribers{
		{Topic: "t", Subscribers: []string{keep.ID().Local, gone.ID().Local}}}}
	a.pushSync(a.view(), Member{ID: "owner", Inbox: "test.owner"}, &wire.Envelope{Body: &wire.Envelope_Sync{Sync: first}}, time.Millisecond)
	m, err := asks.NextMsg(5 * time.Second)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{keep.ID().Local, gone.ID().Local}, pushed(m))
	a.subscriber.remove(gone.ID().Local, "") // unsubscribed locally, its request not yet at the owner
	answer(m, wire.Reply_NOT_READY)
	m, err = asks.NextMsg(5 * time.Second)
	require.NoError(t, err, "no retry")
	assert.Equal(t, []string{keep.ID().Local}, pushed(m), "the retry pushed a subscription unsubscribed meanwhile")
	answer(m, wire.Reply_OK)
}
