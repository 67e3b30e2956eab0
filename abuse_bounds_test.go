package pubsub_test

// Forged traffic in a live member's name. A heartbeat on <prefix>.members
// tells anyone who can read it a live member's ID and incarnation; the
// requests below name that member as their sender. What a node keeps of
// them must stay bounded in bytes, as every map input can grow.

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// abuseHeap returns the heap in use after a full collection.
func abuseHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// memberRef returns n's wire reference to member id, as its heartbeats
// publish it.
func memberRef(t *testing.T, n *pubsub.Node, id string) *wire.MemberRef {
	t.Helper()
	for _, m := range n.Members() {
		if m.ID == id {
			return &wire.MemberRef{NodeId: m.ID, Incarnation: m.Incarnation}
		}
	}
	t.Fatalf("%s not in %s's view", id, n.ID())
	return nil
}

// A producer's ID is a node ID and a tag, or 16 hex digits: a forged
// publish may name one of 256 KB. Owners remember 4 096 producers per
// topic and subscriptions 4 096 each (131 072 per node in all, plus 8 per
// topic and subscription), by that string: 200 such publishes
// held about 100 MB (the owner's copy and the subscription's), and 4 096
// of up to a NATS message each would hold gigabytes per topic and per
// subscription.
func TestForgedPublishesWithHugeProducerIDsAreNotRetained(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	topic := ownedBy(t, n0, "huge-producers")
	rec := newRecorder()
	subscribe(t, n1, topic, rec.handler)
	ref := memberRef(t, n0, n1.ID())
	malformed := n0.Stats().Malformed + n1.Stats().Malformed
	before := abuseHeap()
	pad := strings.Repeat("p", 256<<10)
	const n = 200
	for i := range n {
		data := wire.AppendPublish(nil, &wire.PublishRequest{From: ref, Topic: topic, Count: 1,
			Producer: fmt.Sprintf("%d-%s", i, pad), ProducerSeq: 1}, [][]byte{[]byte("x")}, nil)
		c.ForgeToNode(t, 0, n0.ID(), data)
		if i%20 == 19 {
			time.Sleep(5 * time.Millisecond) // paces the flood so the inbox keeps up
		}
	}
	// Each forged publish is either delivered or dropped as malformed.
	handled := func() int {
		return rec.total() + int(n0.Stats().Malformed+n1.Stats().Malformed-malformed)
	}
	testcluster.WaitFor(t, 20*time.Second, func() bool { return handled() >= n }, "forged publishes handled: %d of %d", handled(), n)
	after := abuseHeap()
	grown := int64(after) - int64(before)
	t.Logf("%d forged publishes with 256 KB producer IDs: heap in use %d -> %d MB; delivered %d", n, before>>20, after>>20, rec.total())
	assert.Less(t, grown, int64(16<<20), "forged producer IDs were retained")
	// The topic still serves its subscriber.
	ack, err := n0.Publish(ctxT(t), topic, []byte("after"))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
}

// Forged publishes naming a new producer each, to several topics: past
// the node's budget of producer marks, the owner and the subscriber's node
// each hold at most the budget plus 8 per topic's map (each map alone is
// far under its 4 096), count what they forgot, and still serve.
func TestForgedProducersOnManyTopicsStayWithinTheNodeBudget(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	const budget, topics, perTopic, floor = 32, 4, 40, 8
	n0.SetProducerMarksLimitForTest(budget)
	n1.SetProducerMarksLimitForTest(budget)
	rec := newRecorder()
	var names []string
	for i := range topics {
		topic := ownedBy(t, n0, fmt.Sprintf("forged-marks-%d", i))
		subscribe(t, n1, topic, rec.handler)
		names = append(names, topic)
	}
	ref := memberRef(t, n0, n1.ID())
	pad := strings.Repeat("p", 100)
	for i := range topics * perTopic {
		data := wire.AppendPublish(nil, &wire.PublishRequest{From: ref, Topic: names[i%topics], Count: 1,
			Producer: fmt.Sprintf("%d-%s", i, pad), ProducerSeq: 1}, [][]byte{[]byte("x")}, nil)
		c.ForgeToNode(t, 0, n0.ID(), data)
		if i%20 == 19 {
			time.Sleep(5 * time.Millisecond) // paces the flood so the inbox keeps up
		}
	}
	testcluster.WaitFor(t, 20*time.Second, func() bool { return rec.total() == topics*perTopic }, "forged publishes delivered: %d of %d", rec.total(), topics*perTopic)
	for _, n := range []*pubsub.Node{n0, n1} {
		st := n.Stats()
		t.Logf("%s: %d producer marks, %d forgotten", n.ID(), st.ProducerMarks, st.ProducerMarksForgotten)
		assert.LessOrEqual(t, st.ProducerMarks, budget+floor*topics, "%s: marks past the node's bound", n.ID())
		assert.NotZero(t, st.ProducerMarksForgotten, "%s: forgetting is counted", n.ID())
	}
	ack, err := n0.Publish(ctxT(t), names[0], []byte("after"))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
}

// The same names on a delivery forged straight to the subscriber's node:
// each subscription remembers 4 096 producers and the last owner by name,
// and an at-least-once batch is remembered by its owner's name and topic
// (65 536 of them).
func TestForgedDeliveriesWithHugeNamesAreNotRetained(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	topic := ownedBy(t, n0, "huge-deliveries")
	rec := newRecorder()
	s := subscribe(t, n1, topic, rec.handler)
	malformed := n1.Stats().Malformed
	before := abuseHeap()
	pad := strings.Repeat("d", 128<<10)
	const n = 200
	for i := range n {
		d := &wire.DeliverBatch{Owner: &wire.MemberRef{NodeId: fmt.Sprintf("o%d-%s", i, pad), Incarnation: 1}, Topic: topic,
			Seq: uint64(i) + 1, Subscribers: []string{s.ID().Local}, Packed: wire.Pack(nil, [][]byte{[]byte("x")}), Count: 1,
			Producer: fmt.Sprintf("p%d-%s", i, pad), ProducerSeq: 1, AtLeastOnce: i%2 == 0}
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: d}})
		require.NoError(t, err)
		c.ForgeToNode(t, 0, n1.ID(), data)
		if i%20 == 19 {
			time.Sleep(5 * time.Millisecond) // paces the flood so the inbox keeps up
		}
	}
	handled := func() int { return rec.total() + int(n1.Stats().Malformed-malformed) }
	testcluster.WaitFor(t, 20*time.Second, func() bool { return handled() >= n }, "forged deliveries handled: %d of %d", handled(), n)
	after := abuseHeap()
	t.Logf("%d forged deliveries with 128 KB owner and producer names: heap in use %d -> %d MB; delivered %d", n, before>>20, after>>20, rec.total())
	assert.Less(t, int64(after)-int64(before), int64(16<<20), "forged names were retained")
}

// A subscriber ID is a tag, a counter and a group name: a forged subscribe
// may name one of 512 KB, and the owner keeps it for as long as the topic
// sees no publish (the subscriber's node answers SubscriberGone only to a
// delivery). 100 such subscribes held about 50 MB.
func TestForgedSubscribesWithHugeSubscriberIDsAreNotRetained(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	topic := ownedBy(t, n0, "huge-subscribers")
	ref := memberRef(t, n0, n1.ID())
	malformed := n0.Stats().Malformed
	before := abuseHeap()
	pad := strings.Repeat("s", 512<<10)
	const n = 100
	for i := range n {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Subscribe{Subscribe: &wire.SubscribeRequest{
			From: ref, Topic: topic, Subscriber: fmt.Sprintf("%d-%s", i, pad)}}})
		require.NoError(t, err)
		c.ForgeToNode(t, 0, n0.ID(), data)
		if i%20 == 19 {
			time.Sleep(5 * time.Millisecond) // paces the flood so the inbox keeps up
		}
	}
	handled := func() int { return n0.Stats().Subscribers[topic] + int(n0.Stats().Malformed-malformed) }
	testcluster.WaitFor(t, 20*time.Second, func() bool { return handled() >= n }, "forged subscribes handled: %d of %d", handled(), n)
	after := abuseHeap()
	grown := int64(after) - int64(before)
	t.Logf("%d forged subscribes with 512 KB subscriber IDs: heap in use %d -> %d MB; recorded %d", n, before>>20, after>>20, n0.Stats().Subscribers[topic])
	assert.Less(t, grown, int64(16<<20), "forged subscriber IDs were retained")
}

// The bound on subscriber IDs leaves room for the longest group name, on a
// subscription registered with a remote owner and moved by a crash.
func TestLongestGroupNameFitsTheSubscriberIDBound(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 3)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	topic := ownedBy(t, n0, "longest-group")
	group := strings.Repeat("g", 256)
	rec := newRecorder()
	_, err := n1.Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup(group))
	require.NoError(t, err)
	ack, err := n1.Publish(ctxT(t), topic, []byte("x"))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
	c.Crash(0)
	publishUntilAccepted(t, c.Nodes[2], topic, []byte("y"), 1, 10*time.Second)
}

// A handler that never returns (it ignores its ctx) keeps its mailbox's
// goroutine for good; the node evicts it (Timeout), but the batches queued
// behind it were held as long as that goroutine: 1 100 publishes of 64 KB
// left about 75 MB held after the eviction, MailboxSize batches of up to a
// NATS message each per stuck subscription. They can only be reported
// SubscriberGone: an ended subscription hands them to nobody.
func TestStuckHandlerReleasesItsMailboxOnceEvicted(t *testing.T) {
	c := newCluster(t, 1, 1)
	n0 := c.Nodes[0]
	topic := ownedBy(t, n0, "stuck")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	s, err := n0.Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		<-release // ignores ctx: stuck until the test ends
		return nil
	})
	require.NoError(t, err)
	before := abuseHeap()
	for i := range 1100 {
		data := make([]byte, 64<<10)
		data[0] = byte(i)
		_, err := n0.PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: data}}, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err)
	}
	stuck := abuseHeap()
	select {
	case <-s.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the stuck subscriber was not evicted")
	}
	require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
	var after uint64
	released := func() bool { after = abuseHeap(); return after < before+16<<20 }
	if !embedded.Poll(5*time.Second, released) {
		t.Errorf("heap in use %d MB before, %d MB while stuck, still %d MB 5 s after the eviction", before>>20, stuck>>20, after>>20)
	}
	t.Logf("heap in use %d MB before, %d MB while stuck, %d MB after the eviction", before>>20, stuck>>20, after>>20)
}

// An at-least-once batch's copies that arrive while it runs wait for its
// report, one reply subject each: the owner sends a handful, so a forged
// flood of copies is refused past 64 (counted), never grows the list, and
// never runs the batch twice.
func TestForgedCopiesOfARunningBatchAreBounded(t *testing.T) {
	c := newCluster(t, 1, 2)
	n1 := c.Nodes[1]
	topic := ownedBy(t, c.Nodes[0], "copy-flood")
	release := make(chan struct{})
	var ran atomic.Int32
	s := subscribe(t, n1, topic, func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data) == "held" {
			ran.Add(1)
			<-release
		}
		return nil
	})
	d := &wire.DeliverBatch{Owner: &wire.MemberRef{NodeId: "forger", Incarnation: 1}, Topic: topic, Seq: 1,
		Subscribers: []string{s.ID().Local}, Packed: wire.Pack(nil, [][]byte{[]byte("held")}), Count: 1, AtLeastOnce: true}
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: d}})
	require.NoError(t, err)
	refused := n1.Stats().RequestsRefused
	c.ForgeToNode(t, 0, n1.ID(), data)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return ran.Load() == 1 }, "the first copy runs")
	const copies = 200
	for range copies {
		c.ForgeToNode(t, 0, n1.ID(), data)
	}
	// The first copy's reply and 63 more wait; the other 137 are refused.
	testcluster.WaitFor(t, 10*time.Second, func() bool { return n1.Stats().RequestsRefused-refused == copies-63 },
		"refused copies: %d, want %d", n1.Stats().RequestsRefused-refused, copies-63)
	close(release)
	// The next batch runs after the held one in the mailbox, so once it is
	// delivered the held batch has reported. (A copy sent right after the
	// release could still find it running, the list full, and be refused:
	// 3 of 160 runs did before this wait.)
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("after"))
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered)
	// A later copy is answered with the report, and does not run the batch.
	assert.Equal(t, pubsub.Delivered, deliverRaw(t, c.Connect(t, 0), n1.ID(), d))
	assert.Equal(t, int32(1), ran.Load(), "the held batch ran once")
	assert.Equal(t, uint64(copies-63), n1.Stats().RequestsRefused-refused)
}

// An AckNone publish sent to a node that does not own its topic is lost,
// and counted as such (Stats().AckNoneRefused) by the count it states. A
// forged one stating 2^32-1 messages in a batch of one counted as four
// billion lost messages (and logged them so): the count is believed only
// once the batch's bytes hold it, and a batch that does not is malformed.
func TestForgedAckNoneCountIsNotCountedAsLostMessages(t *testing.T) {
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[0], "acknone-count")
	other := c.Nodes[1]
	raw := c.Connect(t, 0)
	for _, count := range []uint32{math.MaxUint32, 2} {
		data := wire.AppendPublish(nil, &wire.PublishRequest{From: memberRef(t, other, c.Nodes[0].ID()), Topic: topic,
			AckLevel: uint32(pubsub.AckNone), Count: count}, [][]byte{[]byte("x")}, nil)
		require.NoError(t, raw.Publish("pubsub.node."+other.ID(), data))
	}
	// Answered once the inbox handled the forged publishes before it.
	_, err := raw.Request("pubsub.node."+other.ID(), []byte{0xff}, 5*time.Second)
	require.NoError(t, err)
	st := other.Stats()
	assert.Zero(t, st.AckNoneRefused, "forged counts were counted as lost messages")
	assert.GreaterOrEqual(t, st.Malformed, uint64(3), "the forged publishes (and the probe) were not counted as malformed")
}
