package pubsub_test

// Forged and garbage traffic (finding 8): anyone with publish rights on the
// prefix can send it. It must cost bounded memory and goroutines, and the
// cluster must serve again within 2 x MemberTimeout after it stops.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

func heartbeat(kind wire.Heartbeat_Kind, id string, inc, viewID uint64) []byte {
	data, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: kind, From: &wire.MemberRef{NodeId: id, Incarnation: inc}, ViewId: viewID}}})
	return data
}

// peakGoroutines samples runtime.NumGoroutine until stop is closed and
// returns the highest count seen.
func peakGoroutines(stop <-chan struct{}) <-chan int {
	out := make(chan int, 1)
	go func() {
		peak := 0
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			peak = max(peak, runtime.NumGoroutine())
			select {
			case <-stop:
				out <- peak
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// servesEveryone checks that a fresh topic owned by each node accepts a
// publish that reaches a subscriber on every node.
func servesEveryone(t *testing.T, c *testcluster.Cluster, within time.Duration) {
	t.Helper()
	for i, owner := range c.Nodes {
		topic := ownedBy(t, owner, fmt.Sprintf("after-flood-%d", i))
		rec := newRecorder()
		for _, n := range c.Nodes {
			subscribe(t, n, topic, rec.handler)
		}
		publishUntilAccepted(t, c.Nodes[(i+1)%len(c.Nodes)], topic, []byte("x"), len(c.Nodes), within)
	}
}

func TestFakeHeartbeatFloodIsBoundedAndHeals(t *testing.T) {
	const limit = 64
	c := newCluster(t, 3, 3, pubsub.WithMaxMembers(limit))
	rejected := make(chan pubsub.MemberRejected, 1)
	cancel := c.Nodes[0].Events().Subscribe(func(e pubsub.Event) {
		if r, ok := e.(pubsub.MemberRejected); ok {
			select {
			case rejected <- r:
			default:
			}
		}
	})
	defer cancel()
	base := runtime.NumGoroutine()
	stop := make(chan struct{})
	peak := peakGoroutines(stop)
	raw := c.Connect(t, 0)
	for i := range 10_000 {
		require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, fmt.Sprintf("fake-%d", i), 1, 0)))
	}
	require.NoError(t, raw.Flush())
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[0].Stats().MembersRejected > 0 },
		"no heartbeat was rejected past MaxMembers")
	for _, n := range c.Nodes {
		assert.LessOrEqual(t, len(n.Members()), limit, "%s's view exceeds MaxMembers", n.ID())
	}
	select {
	case r := <-rejected:
		assert.Equal(t, limit, r.Limit)
	case <-time.After(5 * time.Second):
		t.Fatal("no MemberRejected event")
	}
	// The fakes fall silent: within 2 x MemberTimeout (2 s) the view is the
	// real one again and every topic serves.
	healStart := time.Now()
	c.WaitConverged(t, 2*2*time.Second+time.Second)
	close(stop)
	p := <-peak
	t.Logf("goroutines: %d before the flood, peak %d; views healed %v after the flood", base, p, time.Since(healStart))
	assert.Less(t, p, base+300, "goroutines grew with the number of forged members")
	servesEveryone(t, c, 3*time.Second)
}

func TestForgedSyncFloodKeepsHeapBounded(t *testing.T) {
	c := newCluster(t, 1, 2)
	raw := c.Connect(t, 0)
	topics := make([]*wire.TopicSubscribers, 0, 4000)
	for i := range 4000 {
		topics = append(topics, &wire.TopicSubscribers{Topic: fmt.Sprintf("forged-topic-%06d-%0100d", i, 0), Subscribers: []string{"s1", "s2"}})
	}
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	// Syncs from a member nobody knows, for a view that never comes: 200
	// messages of about 0.5 MB each, 100 MB in all.
	for i := range 200 {
		data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Sync{Sync: &wire.Sync{
			From: &wire.MemberRef{NodeId: fmt.Sprintf("ghost-%d", i), Incarnation: 1}, ViewId: uint64(i) + 1, Topics: topics}}})
		require.NoError(t, err)
		require.NoError(t, raw.Publish("pubsub.node."+c.Nodes[0].ID(), data))
	}
	require.NoError(t, raw.Flush())
	// Wait until the node has handled the flood: a request behind it is answered.
	_, err := raw.Request("pubsub.node."+c.Nodes[0].ID(), []byte{0xff}, 10*time.Second)
	require.NoError(t, err)
	after := heap()
	grown := int64(after) - int64(before)
	t.Logf("heap after GC: %d MB before, %d MB after 100 MB of forged syncs", before>>20, after>>20)
	assert.Less(t, grown, int64(16<<20), "forged syncs were retained")
	servesEveryone(t, c, 3*time.Second)
}

func TestBitFlippedTrafficDoesNotStopTheCluster(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "flipped")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[2], topic, rec.handler)
	// Valid envelopes of every kind a node receives, to flip bits in.
	var samples [][]byte
	add := func(env *wire.Envelope) {
		data, err := proto.Marshal(env)
		require.NoError(t, err)
		samples = append(samples, data)
	}
	ref := &wire.MemberRef{NodeId: "n0", Incarnation: 1}
	add(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{From: ref, ViewId: 9}}})
	add(&wire.Envelope{Body: &wire.Envelope_Subscribe{Subscribe: &wire.SubscribeRequest{From: ref, Topic: topic, Subscriber: "x"}}})
	samples = append(samples, wire.AppendPublish(nil, &wire.PublishRequest{From: ref, Topic: topic, Count: 2}, [][]byte{[]byte("a"), []byte("b")}, nil))
	meta := []wire.Meta{{Key: "k", Header: map[string][]string{"h": {"v"}}}, {}}
	samples = append(samples, wire.AppendPublish(nil, &wire.PublishRequest{From: ref, Topic: topic, Count: 2}, [][]byte{[]byte("a"), []byte("b")}, meta))
	add(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Owner: ref, Topic: topic, Seq: 3,
		Subscribers: []string{s.ID().Local}, Packed: wire.Pack(nil, [][]byte{[]byte("z")}), Count: 1}}})
	add(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Owner: ref, Topic: topic, Seq: 4, Publisher: "n0",
		Subscribers: []string{s.ID().Local}, PackedMeta: wire.PackMeta(nil, [][]byte{[]byte("z"), nil}, meta), Count: 2}}})
	add(&wire.Envelope{Body: &wire.Envelope_SyncRequest{SyncRequest: &wire.SyncRequest{From: ref, Members: []*wire.MemberRef{ref}}}})
	add(&wire.Envelope{Body: &wire.Envelope_Evict{Evict: &wire.Evict{Owner: ref, Topic: topic, Subscriber: "nobody"}}})

	rng := rand.New(rand.NewPCG(1, 2))
	flood := func(nc *nats.Conn, count int) {
		for range count {
			data := append([]byte(nil), samples[rng.IntN(len(samples))]...)
			for range 1 + rng.IntN(3) {
				data[rng.IntN(len(data))] ^= 1 << rng.IntN(8)
			}
			subject := "pubsub.members"
			if rng.IntN(2) == 0 {
				subject = "pubsub.node.n" + fmt.Sprint(rng.IntN(3))
			}
			_ = nc.Publish(subject, data)
		}
		_ = nc.Flush()
	}
	raw := c.Connect(t, 0)
	var during atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		flood(raw, 30_000)
	}()
	// Publishes keep being answered while the flood runs.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := 0; ; i++ {
		select {
		case <-done:
		default:
			if _, err := c.Nodes[0].Publish(ctx, topic, msg(i)); err == nil {
				during.Add(1)
			}
			continue
		}
		break
	}
	t.Logf("%d publishes accepted during the flood", during.Load())
	c.WaitConverged(t, 2*2*time.Second+time.Second)
	servesEveryone(t, c, 3*time.Second)
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("after"))
	require.NoError(t, err)
	assert.GreaterOrEqual(t, ack.Delivered, 1)
}

// Publishes to topics nobody subscribes to, from anyone, must not cost the
// owner memory for good: idle topic actors are collected.
func TestPublishesToRandomTopicsDoNotAccumulate(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 1)
	node := c.Nodes[0]
	ctx := ctxT(t)
	for i := range 5000 {
		ack, err := node.Publish(ctx, fmt.Sprintf("random-%d", i), []byte("x"))
		require.NoError(t, err)
		require.Equal(t, 0, ack.Delivered)
	}
	owned := node.Stats().TopicsOwned
	require.GreaterOrEqual(t, owned, 5000)
	kept := ownedBy(t, node, "kept")
	rec := newRecorder()
	s := subscribe(t, node, kept, rec.handler)
	// Collected after MemberTimeout (2 s) idle, checked every MemberTimeout.
	testcluster.WaitFor(t, 3*2*time.Second, func() bool { return node.Stats().TopicsOwned <= 1 },
		"%d topic actors still held, want only the subscribed one", node.Stats().TopicsOwned)
	// A collected topic serves again at once, and batches keep their order
	// for a subscriber that saw the old actor's batches.
	for i := range 3 {
		ack, err := node.Publish(ctx, kept, msg(i))
		mustAccept(t, ack, err, 1)
	}
	ack, err := node.Publish(ctx, "random-7", []byte("x"))
	require.NoError(t, err)
	assert.Equal(t, pubsub.Accepted, ack.Status)
	assert.Equal(t, []string{"m00000", "m00001", "m00002"}, rec.of(s.ID()))
}
