//go:build soak

package pubsub_test

// A storm of recorded, replayed and mutated envelopes on a live cluster:
// anyone allowed to publish on the prefix can send anything on the nodes'
// inboxes and the members subject. Forged but well-formed requests may have
// effects (nothing authenticates them); what must hold is that no node
// panics or stops, state stays bounded, malformed input is counted, and
// once the storm ends every topic serves, every subscription receives the
// workload in order, and no ack claims a delivery no handler ran.

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

type stormSample struct {
	subject string
	data    []byte
}

// stormRuns counts, per message payload, how many times a handler ran it,
// and keeps each subscription's sequence of payloads.
type stormRuns struct {
	mu   sync.Mutex
	runs map[string]int
	seen map[pubsub.SubscriberID][]string
}

func (r *stormRuns) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	r.mu.Lock()
	r.runs[string(m.Data)]++
	r.seen[id] = append(r.seen[id], string(m.Data))
	r.mu.Unlock()
	return nil
}

func (r *stormRuns) of(id pubsub.SubscriberID) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.seen[id]...)
}

func (r *stormRuns) ran(data string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.runs[data]
}

// stormMutator turns a recorded envelope into a forged one. Every choice
// comes from rng, so a seed reproduces the storm's bytes.
type stormMutator struct {
	rng   *rand.Rand
	nodes []string
	huge  string
	// ahead lets a forged delivery or publish number its batch past the
	// genuine ones of its owner or producer, and a forged heartbeat name a
	// live member with a newer incarnation. Off, those numbers only go
	// back (a late copy, dropped). Numbered ahead, a forged delivery gets
	// the subscription evicted (its owner's number) or makes it drop every
	// later genuine batch of that producer as OutOfOrder (a known limit):
	// TestForgedDeliveryAheadOf*; a forged heartbeat stops the member it
	// names (INTERNALS, Known limits: a forger can stop a node).
	ahead bool
	live  map[string]uint64 // the members' incarnations
}

// behind is u64 for a batch number when ahead is off: the number kept, or
// moved back.
func (m *stormMutator) behind(v uint64) uint64 {
	if m.ahead {
		return m.u64(v)
	}
	if v > 0 && m.rng.IntN(2) == 0 {
		return v - 1 - uint64(m.rng.Uint64N(v))
	}
	return v
}

func (m *stormMutator) str(s string) string {
	switch m.rng.IntN(6) {
	case 0:
		return ""
	case 1:
		return m.huge
	case 2:
		return s + s
	case 3:
		return m.nodes[m.rng.IntN(len(m.nodes))]
	}
	return s
}

func (m *stormMutator) u64(v uint64) uint64 {
	switch m.rng.IntN(7) {
	case 0:
		return 0
	case 1:
		return math.MaxUint64
	case 2:
		return v + 1
	case 3:
		return v - 1
	case 4:
		return m.rng.Uint64()
	case 5:
		return v + uint64(m.rng.IntN(1000))
	}
	return v
}

func (m *stormMutator) u32(v uint32) uint32 {
	switch m.rng.IntN(6) {
	case 0:
		return 0
	case 1:
		return math.MaxUint32
	case 2:
		return v + 1
	case 3:
		return m.rng.Uint32()
	}
	return v
}

func (m *stormMutator) ref(r *wire.MemberRef) *wire.MemberRef {
	if r == nil || m.rng.IntN(8) == 0 {
		return nil
	}
	c := proto.Clone(r).(*wire.MemberRef)
	if m.rng.IntN(2) == 0 {
		c.NodeId = m.str(c.NodeId)
	}
	if m.rng.IntN(2) == 0 {
		c.Incarnation = m.u64(c.Incarnation)
	}
	return c
}

// fields changes the decoded envelope's fields: counts, split chunks and IDs,
// sequence numbers, owners and incarnations, view IDs, strings.
func (m *stormMutator) fields(env *wire.Envelope) {
	switch b := env.Body.(type) {
	case *wire.Envelope_Heartbeat:
		h := b.Heartbeat
		h.From = m.ref(h.From)
		h.ViewId = m.u64(h.ViewId)
		h.StableEpoch = m.u64(h.StableEpoch)
		h.StableId = m.u64(h.StableId)
		if m.rng.IntN(4) == 0 {
			h.Kind = wire.Heartbeat_Kind(m.rng.IntN(5))
		}
		if m.rng.IntN(4) == 0 {
			h.StableMembers = append(h.StableMembers, m.ref(h.GetFrom()))
		}
	case *wire.Envelope_Subscribe:
		s := b.Subscribe
		s.From = m.ref(s.From)
		s.ViewId = m.u64(s.ViewId)
		s.Topic = m.str(s.Topic)
		s.Subscriber = m.str(s.Subscriber)
		s.Stats = m.rng.IntN(4) == 0
	case *wire.Envelope_Publish:
		p := b.Publish
		p.From = m.ref(p.From)
		p.ViewId = m.u64(p.ViewId)
		p.Count = m.u32(p.Count)
		p.SplitId = m.u64(p.SplitId)
		p.SplitChunk = m.u32(p.SplitChunk)
		p.Producer = m.str(p.Producer)
		p.ProducerSeq = m.behind(p.ProducerSeq)
		p.ProducerPrev = m.u64(p.ProducerPrev)
		p.ProducerSettled = m.u64(p.ProducerSettled)
		p.AckLevel = m.u32(p.AckLevel)
		p.AnswerWithinMs = m.u32(p.AnswerWithinMs)
		if m.rng.IntN(3) == 0 {
			p.Topic = m.str(p.Topic)
		}
		if m.rng.IntN(4) == 0 {
			p.DeliveredIds = true
			p.Skip = append(p.Skip, &wire.Failure{Node: m.str("n0"), Local: m.str("x"), Status: m.u32(1)})
		}
	case *wire.Envelope_Deliver:
		d := b.Deliver
		d.Owner = m.ref(d.Owner)
		d.Seq = m.behind(d.Seq)
		d.Count = m.u32(d.Count)
		d.SplitId = m.u64(d.SplitId)
		d.SplitChunk = m.u32(d.SplitChunk)
		d.Producer = m.str(d.Producer)
		d.ProducerSeq = m.behind(d.ProducerSeq)
		d.Publisher = m.str(d.Publisher)
		d.SubscriberTimeoutMs = m.u32(d.SubscriberTimeoutMs)
		if m.rng.IntN(3) == 0 {
			d.Topic = m.str(d.Topic)
		}
		if m.rng.IntN(4) == 0 {
			d.Reroute = !d.Reroute
		}
		if m.rng.IntN(4) == 0 {
			d.AtLeastOnce = !d.AtLeastOnce
		}
		for i := range d.Subscribers {
			if m.rng.IntN(4) == 0 {
				d.Subscribers[i] = m.str(d.Subscribers[i])
			}
		}
		for _, s := range d.Shares {
			for i := range s.Indices {
				if m.rng.IntN(3) == 0 {
					s.Indices[i] = m.u32(s.Indices[i])
				}
			}
		}
	case *wire.Envelope_Sync:
		s := b.Sync
		s.From = m.ref(s.From)
		s.ViewId = m.u64(s.ViewId)
		s.More = m.rng.IntN(2) == 0
		s.Incomplete = m.rng.IntN(4) == 0
		for _, ts := range s.Topics {
			ts.Topic = m.str(ts.Topic)
			ts.Node = m.str(ts.Node)
		}
	case *wire.Envelope_SyncRequest:
		s := b.SyncRequest
		s.From = m.ref(s.From)
		s.ViewId = m.u64(s.ViewId)
		s.AfterTopic = m.str(s.AfterTopic)
		s.AfterSubscriber = m.str(s.AfterSubscriber)
		s.Handover = m.rng.IntN(8) == 0
	case *wire.Envelope_Evict:
		e := b.Evict
		e.Owner = m.ref(e.Owner)
		e.Topic = m.str(e.Topic)
		e.Subscriber = m.str(e.Subscriber)
		e.Status = m.u32(e.Status)
	case *wire.Envelope_Topics:
		b.Topics.From = m.ref(b.Topics.From)
		b.Topics.After = m.str(b.Topics.After)
	}
}

// mutate returns a forged copy of data: replayed as is, bits flipped,
// truncated, fields changed, or a field or the whole body repeated.
func (m *stormMutator) mutate(data []byte) []byte {
	out := m.forge(data)
	if !m.ahead && m.numbersAhead(data, out) {
		return append([]byte(nil), data...) // replayed as is instead
	}
	return out
}

// numbersAhead reports whether forged numbers its batch past the one
// original was: a higher delivery or producer sequence number.
func (m *stormMutator) numbersAhead(original, forged []byte) bool {
	var a, b wire.Envelope
	if wire.Decode(original, &a) != nil || wire.Decode(forged, &b) != nil {
		return false
	}
	if h := b.GetHeartbeat(); h != nil {
		for _, r := range append(append(append([]*wire.MemberRef{h.GetFrom()}, h.GetMembers()...), h.GetStableMembers()...), h.GetPrevMembers()...) {
			if inc, ok := m.live[r.GetNodeId()]; ok && r.GetIncarnation() > inc {
				return true
			}
		}
		return false
	}
	if d := b.GetDeliver(); d != nil {
		return d.GetSeq() > a.GetDeliver().GetSeq() || d.GetProducerSeq() > a.GetDeliver().GetProducerSeq()
	}
	if p := b.GetPublish(); p != nil {
		return p.GetProducerSeq() > a.GetPublish().GetProducerSeq()
	}
	return false
}

func (m *stormMutator) forge(data []byte) []byte {
	out := append([]byte(nil), data...)
	switch k := m.rng.IntN(10); {
	case k == 0: // replay as is
	case k <= 2:
		if len(out) > 0 {
			for range 1 + m.rng.IntN(4) {
				out[m.rng.IntN(len(out))] ^= 1 << m.rng.IntN(8)
			}
		}
	case k == 3:
		out = out[:m.rng.IntN(len(out)+1)]
	case k <= 7:
		var env wire.Envelope
		if wire.Decode(data, &env) != nil {
			return out
		}
		m.fields(&env)
		if b, err := proto.Marshal(&env); err == nil {
			out = b
		}
	case k == 8: // the body twice: a protobuf merge, or malformed
		out = append(out, data...)
	default: // one extra field inside the body: a duplicated varint field
		num, typ, n := protowire.ConsumeTag(out)
		if n < 0 || typ != protowire.BytesType {
			return out
		}
		body, bn := protowire.ConsumeBytes(out[n:])
		if bn < 0 {
			return out
		}
		body = append(append([]byte(nil), body...), protowire.AppendVarint(protowire.AppendTag(nil, protowire.Number(1+m.rng.IntN(17)), protowire.VarintType), m.rng.Uint64())...)
		out = protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), body)
	}
	return out
}

type stormConfig struct {
	seed   uint64
	record int // envelopes recorded before the storm
	storm  int // forged envelopes sent
	rounds int // workload publishes per topic during the storm
}

func runStorm(t *testing.T, cfg stormConfig) {
	const prefix = "pubsub"
	c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(func(topic string) pubsub.DeliveryMode {
		if strings.HasPrefix(topic, "storm-alo") {
			return pubsub.AtLeastOnce
		}
		return pubsub.AtMostOnce
	}))
	var nodeIDs []string
	for _, n := range c.Nodes {
		nodeIDs = append(nodeIDs, n.ID())
	}
	stopped := make(chan string, 16)
	for _, n := range c.Nodes {
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if s, ok := e.(pubsub.NodeStopped); ok {
				select {
				case stopped <- fmt.Sprintf("%+v", s):
				default:
				}
			}
		})
		t.Cleanup(cancel)
	}

	raw := c.Connect(t, 0)
	recorded := make(chan *nats.Msg, 2*cfg.record)
	rec, err := raw.ChanSubscribe(prefix+".>", recorded)
	require.NoError(t, err)
	require.NoError(t, raw.Flush())

	// The workload: an at-least-once and an at-most-once topic with a
	// subscriber on every node, and an at-most-once topic with a consumer
	// group of one member per node.
	alo := ownedBy(t, c.Nodes[1], "storm-alo")
	amo := ownedBy(t, c.Nodes[2], "storm-amo")
	grp := ownedBy(t, c.Nodes[0], "storm-grp")
	runs := &stormRuns{runs: map[string]int{}, seen: map[pubsub.SubscriberID][]string{}}
	var broadcast []*pubsub.Subscription
	for _, n := range c.Nodes {
		for _, topic := range []string{alo, amo} {
			broadcast = append(broadcast, subscribe(t, n, topic, runs.handler))
		}
		_, err := n.Subscribe(ctxT(t), grp, runs.handler, pubsub.WithGroup("g"))
		require.NoError(t, err)
	}
	ended := make(chan string, 64)
	for _, s := range broadcast {
		go func() {
			<-s.Done()
			ended <- fmt.Sprintf("%s: %v", s.ID(), s.Err())
		}()
	}
	topics := []string{alo, amo, grp}

	type sent struct {
		data      string
		delivered int
	}
	var acksMu sync.Mutex
	var acks []sent
	counter := map[string]int{}
	publish := func(ctx context.Context, from *pubsub.Node, topic string, size int) (pubsub.PublishAck, []string, error) {
		var batch [][]byte
		var datas []string
		for range size {
			d := fmt.Sprintf("%s/%05d", topic, counter[topic])
			counter[topic]++
			batch = append(batch, []byte(d))
			datas = append(datas, d)
		}
		ack, err := from.PublishBatch(ctx, topic, batch)
		if err == nil && ack.Status == pubsub.Accepted {
			acksMu.Lock()
			for _, d := range datas {
				// ack.Delivered counts subscribers that ran the whole batch.
				acks = append(acks, sent{d, ack.Delivered})
			}
			acksMu.Unlock()
		}
		return ack, datas, err
	}

	// 1. Record the real traffic on the prefix while the workload runs.
	ctx := ctxT(t)
	for _, n := range c.Nodes {
		_, err := n.Topics(ctx)
		require.NoError(t, err)
		_, err = n.TopicStats(ctx, alo)
		require.NoError(t, err)
	}
	for i := 0; len(recorded) < cfg.record; i++ {
		require.Less(t, i, 2000, "recorded only %d envelopes", len(recorded))
		for j, topic := range topics {
			ack, _, err := publish(ctx, c.Nodes[(i+j)%3], topic, 1+i%3)
			require.NoError(t, err)
			require.Equal(t, pubsub.Accepted, ack.Status)
		}
	}
	require.NoError(t, rec.Unsubscribe())
	mut := &stormMutator{rng: rand.New(rand.NewPCG(cfg.seed, 26)), nodes: append(nodeIDs, "ghost"), huge: strings.Repeat("h", 70_000), live: map[string]uint64{}}
	for _, m := range c.Nodes[0].Members() {
		mut.live[m.ID] = m.Incarnation
	}
	var samples []stormSample
	kinds := map[string]int{}
	for len(recorded) > 0 {
		m := <-recorded
		samples = append(samples, stormSample{m.Subject, m.Data})
		var env wire.Envelope
		if wire.Decode(m.Data, &env) == nil {
			kinds[fmt.Sprintf("%T", env.Body)]++
		}
	}
	// Kinds the workload sends rarely or only at a join, forged from the
	// recorded members' names.
	for _, n := range c.Nodes {
		from := &wire.MemberRef{NodeId: n.ID(), Incarnation: mut.live[n.ID()]}
		inbox := prefix + ".node." + nodeIDs[(len(samples)+1)%3]
		for _, env := range []*wire.Envelope{
			{Body: &wire.Envelope_SyncRequest{SyncRequest: &wire.SyncRequest{From: from, ViewId: 1, Members: []*wire.MemberRef{from}}}},
			{Body: &wire.Envelope_Sync{Sync: &wire.Sync{From: from, ViewId: 1, Topics: []*wire.TopicSubscribers{{Topic: amo, Subscribers: []string{"forged"}}}}}},
			{Body: &wire.Envelope_Evict{Evict: &wire.Evict{Owner: from, Topic: alo, Subscriber: "nobody", Status: 2}}},
			{Body: &wire.Envelope_Topics{Topics: &wire.TopicsRequest{From: from}}},
			{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: from, Members: []*wire.MemberRef{from}}}},
		} {
			data, err := proto.Marshal(env)
			require.NoError(t, err)
			samples = append(samples, stormSample{inbox, data})
		}
	}
	t.Logf("recorded %d envelopes: %v", len(samples), kinds)

	// 2. The storm, with the workload going on beside it.
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	malformedBefore := uint64(0)
	for _, n := range c.Nodes {
		malformedBefore += n.Stats().Malformed
	}
	heapBefore, base := heap(), runtime.NumGoroutine()
	stop := make(chan struct{})
	peak := peakGoroutines(stop)
	replies, err := raw.SubscribeSync("storm-replies.>")
	require.NoError(t, err)
	defer func() { _ = replies.Unsubscribe() }()
	require.NoError(t, replies.SetPendingLimits(-1, -1))
	var forged atomic.Int64
	stormDone := make(chan struct{})
	go func() {
		defer close(stormDone)
		subjects := []string{prefix + ".members"}
		for _, id := range nodeIDs {
			subjects = append(subjects, prefix+".node."+id)
		}
		for i := range cfg.storm {
			s := samples[mut.rng.IntN(len(samples))]
			subject := s.subject
			if mut.rng.IntN(3) == 0 {
				subject = subjects[mut.rng.IntN(len(subjects))]
			}
			data := mut.mutate(s.data)
			var err error
			if mut.rng.IntN(2) == 0 {
				err = raw.PublishRequest(subject, fmt.Sprintf("storm-replies.%d", i), data)
			} else {
				err = raw.Publish(subject, data)
			}
			if err == nil {
				forged.Add(1)
			}
			if i%500 == 499 {
				_ = raw.Flush()
			}
		}
		_ = raw.Flush()
	}()
	for i := 0; i < cfg.rounds; i++ {
		for j, topic := range topics {
			// Refusals and failures are allowed during the storm; only
			// the acks of accepted batches are checked below.
			pctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _, _ = publish(pctx, c.Nodes[(i+j)%3], topic, 1+i%3)
			cancel()
		}
	}
	<-stormDone
	t.Logf("%d forged envelopes sent", forged.Load())

	// 3. After the storm: views converge, every node still runs, state is
	// bounded, and the malformed envelopes were counted.
	select {
	case s := <-stopped:
		t.Fatalf("a node stopped during the storm: %s", s)
	default:
	}
	c.WaitConverged(t, 3*2*time.Second)
	close(stop)
	p := <-peak
	malformed := uint64(0)
	for _, n := range c.Nodes {
		malformed += n.Stats().Malformed
	}
	heapAfter := heap()
	t.Logf("goroutines: %d before, peak %d; heap %d MB before, %d MB after; malformed counted %d",
		base, p, heapBefore>>20, heapAfter>>20, malformed-malformedBefore)
	assert.Less(t, p, base+1000, "goroutines grew with the forged traffic")
	assert.Less(t, int64(heapAfter)-int64(heapBefore), int64(64<<20), "forged traffic was retained")
	assert.Greater(t, malformed, malformedBefore, "no malformed envelope was counted")

	servesEveryone(t, c, 5*time.Second)

	// 4. The workload after the storm: every batch is accepted and
	// delivered to every subscriber, each broadcast subscription receives
	// it in order, none missing and none twice.
	ctx = ctxT(t) // the storm may have outlasted the first one
	var after = map[string][]string{}
	for i := range 20 {
		for j, topic := range topics {
			want := 3
			if topic == grp {
				want = 1
			}
			var ack pubsub.PublishAck
			var datas []string
			var err error
			testcluster.WaitFor(t, 10*time.Second, func() bool {
				ack, datas, err = publish(ctx, c.Nodes[(i+j)%3], topic, 1)
				return err == nil && ack.Status == pubsub.Accepted
			}, "%s does not serve after the storm: %v %+v", topic, &err, &ack)
			assert.Equal(t, want, ack.Delivered, "%s after the storm: ack %+v", topic, ack)
			after[topic] = append(after[topic], datas...)
		}
	}
	select {
	case e := <-ended:
		t.Logf("a subscription ended during the storm (told by Done/Err): %s", e)
	default:
	}
	for _, s := range broadcast {
		select {
		case <-s.Done():
			continue // ended with a reason: not silent
		default:
		}
		want := after[s.Topic()]
		testcluster.WaitFor(t, 5*time.Second, func() bool {
			got := tail(runs.of(s.ID()), want[0])
			return len(got) >= len(want)
		}, "%s stopped receiving %s after the storm: got %v", s.ID(), s.Topic(), tail(runs.of(s.ID()), want[0]))
		assert.Equal(t, want, tail(runs.of(s.ID()), want[0]), "%s: the workload after the storm, in order, once each", s.ID())
	}
	// No ack claims more deliveries than handlers ran.
	acksMu.Lock()
	defer acksMu.Unlock()
	for _, a := range acks {
		if got := runs.ran(a.data); got < a.delivered {
			t.Errorf("%s: the ack claims %d deliveries, handlers ran it %d times", a.data, a.delivered, got)
		}
	}
}

// tail returns seen from the first occurrence of first.
func tail(seen []string, first string) []string {
	for i, s := range seen {
		if s == first {
			return seen[i:]
		}
	}
	return nil
}

// TestSoakForgedAndMutatedTrafficStormShort: 6 000 forged envelopes. STORM_SEED=n
// picks another storm (the recorded envelopes differ from run to run; the
// choices made on them do not).
func TestSoakForgedAndMutatedTrafficStormShort(t *testing.T) {
	seed := uint64(1)
	if v := os.Getenv("STORM_SEED"); v != "" {
		_, _ = fmt.Sscan(v, &seed)
	}
	runStorm(t, stormConfig{seed: seed, record: 600, storm: 6000, rounds: 20})
}
