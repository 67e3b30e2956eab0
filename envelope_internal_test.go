package pubsub

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// messagesPub is a mock Publisher that also carries keys and headers.
type messagesPub struct {
	*mockPub
	mu  sync.Mutex
	got [][]Outgoing
}

func (p *messagesPub) PublishMessages(ctx context.Context, topic string, msgs []Outgoing, _ ...PublishOption) (PublishAck, error) {
	p.mu.Lock()
	p.got = append(p.got, append([]Outgoing(nil), msgs...))
	p.mu.Unlock()
	return PublishAck{Topic: topic, Status: Accepted, Messages: len(msgs), Delivered: 1}, nil
}

func TestProduceMessageThroughAnyPublisher(t *testing.T) {
	t.Run("without PublishMessages", func(t *testing.T) {
		m := newMock()
		p := newTestProducer(t, m, ProducerConfig{})
		_, err := p.ProduceMessage(t.Context(), Outgoing{Data: []byte("k"), Key: "k"}).Wait(t.Context())
		require.ErrorIs(t, err, ErrInvalidConfig, "a key needs a Publisher that carries it")
		_, err = p.ProduceMessage(t.Context(), Outgoing{Data: []byte("plain")}).Wait(t.Context())
		require.NoError(t, err, "a message without key or header needs nothing more")
		assert.Equal(t, [][]string{{"plain"}}, m.recorded())
	})
	t.Run("with PublishMessages", func(t *testing.T) {
		m := &messagesPub{mockPub: newMock()}
		p := newTestProducer(t, m, ProducerConfig{BatchSize: 3})
		futures := []*Produced{
			p.ProduceMessage(t.Context(), Outgoing{Data: []byte("a"), Key: "ka", Header: Header{"h": {"1"}}}),
			p.Produce(t.Context(), []byte("b")),
			p.ProduceMessage(t.Context(), Outgoing{Data: []byte("c"), Key: "kc"}),
		}
		for _, f := range futures {
			_, err := f.Wait(t.Context())
			require.NoError(t, err)
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		keys := map[string]string{}
		total := 0
		for _, batch := range m.got {
			for _, o := range batch {
				keys[string(o.Data)] = o.Key
				total++
			}
		}
		for _, batch := range m.recorded() {
			total += len(batch) // plain batches go through PublishBatch
		}
		assert.Equal(t, 3, total)
		assert.Equal(t, "ka", keys["a"], "a batch with keys goes through PublishMessages with them")
		assert.Equal(t, "kc", keys["c"])
	})
}

// A status number from a newer node that this one cannot name is reported
// as HandlerError, however large: a uint32 past 255 once wrapped to
// Delivered.
func TestUnknownRemoteStatusIsHandlerError(t *testing.T) {
	rep := &wire.Reply{Code: wire.Reply_OK, Statuses: []uint32{uint32(Delivered), uint32(DecodeError), uint32(lastDeliveryStatus) + 1, 256, 1 << 31}}
	st, processed, path := remoteStatuses(&Node{}, "n", len(rep.Statuses), rep, nil)
	assert.False(t, path)
	assert.Nil(t, processed)
	assert.Equal(t, []DeliveryStatus{Delivered, DecodeError, HandlerError, HandlerError, HandlerError}, st)
}

// A request of this node's own to a topic it owns queues on the topic's
// actor: past the actor's bound it is refused with ErrQueueFull, counted,
// not queued without end. Both kinds of call: an AckNone publish, which
// nobody waits for, and one that waits for the answer (regression: that
// one was unbounded, and a call whose ctx ends returns while its request
// stays queued, so a loop of short-lived calls to a stalled actor grew the
// queue without limit).
func TestLocalActorQueueIsBounded(t *testing.T) {
	for _, noAnswer := range []bool{true, false} {
		t.Run(fmt.Sprintf("noAnswer=%v", noAnswer), func(t *testing.T) {
			n := &Node{self: Member{ID: "a", Incarnation: 1}}
			n.log.Logger = slog.New(slog.DiscardHandler)
			n.life.ctx, n.life.cancel = context.WithCancel(t.Context())
			defer n.life.cancel()
			n.events = newEventStream(n.self.ID)
			n.members.views.cur.Store(newView(1, []Member{n.self}))
			n.owner.init(n)
			running, release := make(chan struct{}), make(chan struct{})
			n.owner.onActor("t", false, func(*topicActor) { close(running); <-release }) // keeps the actor busy
			<-running
			req := readinessProbe{from: n.selfRef(), topic: "t"}
			if noAnswer {
				var err error
				for i := 0; i <= maxActorQueue && err == nil; i++ {
					_, err = n.askLocal(t.Context(), "t", req, func() {}, true)
				}
				require.ErrorIs(t, err, ErrQueueFull)
			} else {
				// Requests whose callers gave up, as a loop with a short
				// ctx leaves them, fill the queue.
				for range maxActorQueue {
					require.True(t, n.owner.onActor("t", true, func(*topicActor) {}))
				}
				ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second) // queued, it would wait for the stalled actor
				defer cancel()
				_, err := n.askLocal(ctx, "t", req, func() {}, false)
				require.ErrorIs(t, err, ErrQueueFull)
				assert.ErrorContains(t, err, "retry")
			}
			assert.Equal(t, uint64(1), n.stats.refused.Load())
			drain := func() { // returns once the actor ran what it held
				drained := make(chan struct{})
				n.owner.onActor("t", false, func(*topicActor) { close(drained) })
				<-drained
			}
			close(release)
			drain()
			// The actor has room again: a waiting call is answered.
			ans, err := n.askLocal(t.Context(), "t", req, func() {}, false)
			require.NoError(t, err)
			assert.NotZero(t, ans.viewID)
			drain() // the actor's goroutine ends before the test does
		})
	}
}

// Consecutive early-ack publishes of one publisher are served as one batch;
// each request still gets its own answer with its own message count.
// noneServed is mergeEarly's served for an actor that served no batch.
func noneServed(string) uint64 { return 0 }

// Found by a soak (TestSoakRollingServerRestart, once): during a server
// restart a publisher's AckNone request 11 reached the owner after its
// request 12, which the owner had served; merged with request 13, it took
// number 13, and every subscriber ran message 1204 after 1206. A late
// request now goes alone under its own number (subscribers drop it as
// late), and requests merge only in the order of their numbers.
func TestMergeEarlyKeepsALateRequestUnderItsOwnNumber(t *testing.T) {
	n := &Node{}
	req := func(seq uint64, msg string) earlyRequest {
		return earlyRequest{msgs: payload{packed: wire.Pack(nil, [][]byte{[]byte(msg)}), count: 1, publisher: "a",
			origin: batchOrigin{producer: "a/p", seq: seq}, level: AckNone}}
	}
	served12 := func(p string) uint64 {
		if p == "a/p" {
			return 12
		}
		return 0
	}
	runs := n.mergeEarlyWithin("t", []earlyRequest{req(11, "1204"), req(13, "1207"), req(14, "1208")}, 1<<20, served12)
	require.Len(t, runs, 2)
	assert.Equal(t, uint64(11), runs[0].msgs.origin.seq, "the late request keeps its own number")
	assert.Equal(t, 1, runs[0].msgs.count)
	assert.Equal(t, uint64(14), runs[1].msgs.origin.seq)
	assert.Equal(t, 2, runs[1].msgs.count)

	// Late within one pass: 12 merged first, then 11 and 13 arrive.
	runs = n.mergeEarlyWithin("t", []earlyRequest{req(12, "1206"), req(11, "1204"), req(13, "1207")}, 1<<20, noneServed)
	require.Len(t, runs, 3)
	for i, want := range []uint64{12, 11, 13} {
		assert.Equal(t, want, runs[i].msgs.origin.seq, "run %d", i)
		assert.Equal(t, 1, runs[i].msgs.count, "run %d", i)
	}
}

func TestMergeEarlyJoinsRunsOfOnePublisher(t *testing.T) {
	n := &Node{}
	plain := func(publisher string, seq uint64, msgs ...string) payload {
		data := make([][]byte, len(msgs))
		for i, m := range msgs {
			data[i] = []byte(m)
		}
		return payload{packed: wire.Pack(nil, data), count: len(msgs), publisher: publisher,
			origin: batchOrigin{producer: publisher + "/p", seq: seq}, level: AckNone}
	}
	withMeta := plain("a", 9, "m")
	withMeta.withMeta = true
	reqs := []earlyRequest{
		{plain("a", 1, "1", "2"), ""}, {plain("a", 2, "3"), ""}, // one run
		{plain("b", 1, "x"), ""}, // another publisher
		{withMeta, ""},           // keys or headers: alone
		{plain("a", 3, "4"), ""},
	}
	runs := n.mergeEarlyWithin("t", reqs, 1<<20, noneServed)
	require.Len(t, runs, 4)
	got := runs[0].msgs.messages("t").msgs
	require.Len(t, got, 3)
	assert.Equal(t, "3", string(got[2].Data))
	assert.Equal(t, uint64(2), runs[0].msgs.origin.seq, "the run carries its last number")
	assert.Equal(t, 1, runs[1].msgs.count)
	assert.True(t, runs[2].msgs.withMeta)
	assert.Equal(t, "4", string(runs[3].msgs.messages("t").msgs[0].Data))
	// The size limit splits runs too.
	assert.Len(t, n.mergeEarlyWithin("t", reqs[:2], 4, noneServed), 2)

	// A run names the copies its publisher kept of each request, in
	// order (kept.go), only when it kept one of each.
	kept := func(p payload, id uint64) payload {
		p.kept = keptRef{ids: []uint64{id}, inc: 5}
		return p
	}
	runs = n.mergeEarlyWithin("t", []earlyRequest{{kept(plain("a", 1, "1"), 11), ""}, {kept(plain("a", 2, "2"), 12), ""}}, 1<<20, noneServed)
	require.Len(t, runs, 1)
	assert.Equal(t, keptRef{ids: []uint64{11, 12}, inc: 5}, runs[0].msgs.kept)
	runs = n.mergeEarlyWithin("t", []earlyRequest{{kept(plain("a", 1, "1"), 11), ""}, {plain("a", 2, "2"), ""}}, 1<<20, noneServed)
	require.Len(t, runs, 1)
	assert.Empty(t, runs[0].msgs.kept.ids, "a request without a copy")
}
