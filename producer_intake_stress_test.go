package pubsub

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/stretchr/testify/require"
)

type valueKey struct{}

type zeroCtx struct{ context.Context } // not zero size, but value type
type emptyValCtx struct{}              // zero size, value type

func (emptyValCtx) Deadline() (d time.Time, ok bool) { return }
func (emptyValCtx) Done() <-chan struct{}            { return nil }
func (emptyValCtx) Err() error                       { return nil }
func (emptyValCtx) Value(any) any                    { return nil }

type otherEmptyValCtx struct{}

func (otherEmptyValCtx) Deadline() (d time.Time, ok bool) { return }
func (otherEmptyValCtx) Done() <-chan struct{}            { return nil }
func (otherEmptyValCtx) Err() error                       { return context.Canceled }
func (otherEmptyValCtx) Value(any) any                    { return nil }

type intCtx int

func (intCtx) Deadline() (d time.Time, ok bool) { return }
func (intCtx) Done() <-chan struct{}            { return nil }
func (c intCtx) Err() error {
	if c%2 == 1 {
		return context.Canceled
	}
	return nil
}
func (intCtx) Value(any) any { return nil }

// checkClean fails if b holds any reference.
func checkClean(t *testing.T, b *intakeBlock, what string) {
	t.Helper()
	require.Nil(t, b.next, what)
	require.Zero(t, b.r, what)
	require.Zero(t, b.w, what)
	require.Zero(t, b.cr, what)
	require.Zero(t, b.mr, what)
	for i, c := range b.ctxs[:cap(b.ctxs)] {
		if c.ctx != nil {
			t.Fatalf("%s: ctxs[%d] kept", what, i)
		}
	}
	for i, m := range b.metas[:cap(b.metas)] {
		if m.meta != nil {
			t.Fatalf("%s: metas[%d] kept", what, i)
		}
	}
	for i := range b.e {
		if b.e[i].fut != nil || b.e[i].data != nil {
			t.Fatalf("%s: e[%d] kept", what, i)
		}
	}
}

// A random model of Produce (push into in), the actor (take when pend is
// empty, then pop) and shutIntake (drain both): every message comes back
// with its context and meta, in order, and no block keeps a reference.
func TestIntakeQueueRandomModel(t *testing.T) {
	base, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctxs := []context.Context{
		context.Background(), context.TODO(), base,
		context.WithValue(base, valueKey{}, 1), context.WithValue(base, valueKey{}, 1),
		emptyValCtx{}, otherEmptyValCtx{}, intCtx(0), intCtx(1), intCtx(1000), intCtx(1001),
		zeroCtx{}, zeroCtx{base},
	}
	for seed := range uint64(2) {
		r := rand.New(rand.NewPCG(seed, 7))
		var in, pend intakeQueue
		var want []queuedMessage
		var ids []int // ctx index
		got := 0
		n := 0
		check := func(q *intakeQueue) {
			m := q.front()
			w := want[got]
			require.Equal(t, string(w.data), string(m.data), "seed %d msg %d", seed, got)
			require.Same(t, w.fut, m.fut)
			require.Same(t, w.meta, m.meta, "seed %d msg %d", seed, got)
			require.True(t, m.ctx == w.ctx, "seed %d msg %d: ctx %d", seed, got, ids[got])
			h := q.head
			q.pop()
			if q.head != h {
				checkClean(t, h, fmt.Sprintf("seed %d released block", seed))
			} else {
				if h.cr > 0 && h.ctxs[h.cr-1].ctx != nil {
					t.Fatalf("seed %d: passed run keeps its context", seed)
				}
				if h.mr > 0 && h.metas[h.mr-1].meta != nil {
					t.Fatalf("seed %d: read meta kept", seed)
				}
				if e := h.e[h.r-1]; e.fut != nil || e.data != nil {
					t.Fatalf("seed %d: read entry kept", seed)
				}
			}
			got++
		}
		for step := 0; step < 600; step++ {
			switch k := r.IntN(100); {
			case k < 60:
				burst := 1 + r.IntN(700)
				ci := r.IntN(len(ctxs))
				for range burst {
					if r.IntN(4) == 0 {
						ci = r.IntN(len(ctxs))
					}
					m := queuedMessage{data: pm(n), fut: new(Produced), ctx: ctxs[ci]}
					// also new boxed value each time, sometimes
					if r.IntN(10) == 0 {
						m.ctx = zeroCtx{base}
					}
					if r.IntN(3) == 0 {
						m.meta = &wire.Meta{Key: fmt.Sprint(n)}
					}
					in.push(m)
					want = append(want, m)
					ids = append(ids, ci)
					n++
				}
			case k < 98:
				pops := 1 + r.IntN(900)
				for range pops {
					if pend.empty() {
						pend = in.take()
						if pend.empty() {
							break
						}
					}
					check(&pend)
				}
			default:
				for _, q := range []*intakeQueue{&pend, &in} {
					for !q.empty() {
						check(q)
					}
				}
			}
		}
		for _, q := range []*intakeQueue{&pend, &in} {
			for !q.empty() {
				check(q)
			}
		}
		require.Equal(t, n, got)
	}
}

// publishedOnce maps each published message's data to its key, failing
// if any was published twice.
func publishedOnce(t *testing.T, msgs []Outgoing) map[string]string {
	t.Helper()
	published := make(map[string]string, len(msgs))
	for _, m := range msgs {
		_, dup := published[string(m.Data)]
		require.False(t, dup, "%s published twice", m.Data)
		published[string(m.Data)] = m.Key
	}
	return published
}

// gatedMetaPub records every message (data and key) and holds each call
// until gate is closed.
type gatedMetaPub struct {
	mu      sync.Mutex
	gate    chan struct{}
	started chan struct{}
	got     []Outgoing
}

func (g *gatedMetaPub) wait(ctx context.Context, msgs []Outgoing) (PublishAck, error) {
	select {
	case g.started <- struct{}{}:
	default:
	}
	select {
	case <-g.gate:
	case <-ctx.Done(): // as a real publisher would: Close may give up on it
		return rejected("test-topic", len(msgs), ctx.Err())
	}
	g.mu.Lock()
	g.got = append(g.got, msgs...)
	g.mu.Unlock()
	return PublishAck{Status: Accepted, Messages: len(msgs), Delivered: 1}, nil
}

func (g *gatedMetaPub) Publish(ctx context.Context, topic string, data []byte) (PublishAck, error) {
	return g.PublishBatch(ctx, topic, [][]byte{data})
}

func (g *gatedMetaPub) PublishBatch(ctx context.Context, topic string, batch [][]byte) (PublishAck, error) {
	out := make([]Outgoing, len(batch))
	for i, d := range batch {
		out[i] = Outgoing{Data: d}
	}
	return g.wait(ctx, out)
}

func (g *gatedMetaPub) PublishMessages(ctx context.Context, topic string, msgs []Outgoing, _ ...PublishOption) (PublishAck, error) {
	return g.wait(ctx, append([]Outgoing(nil), msgs...))
}

// Many goroutines produce with their own contexts (one shared per
// goroutine, one per message, or value contexts), some with keys, behind a
// held batch; then some contexts are cancelled and the publisher let go.
// Every message comes back with its own context: cancelled ones are dropped
// with context.Canceled, the others published once with their own key.
func TestProduceManyContextsCancelSome(t *testing.T) {
	for _, withClose := range []bool{false, true} {
		t.Run(fmt.Sprint("close=", withClose), func(t *testing.T) {
			g := &gatedMetaPub{gate: make(chan struct{}), started: make(chan struct{}, 1)}
			p, err := NewBatchingProducer(g, "test-topic", ProducerConfig{BatchSize: 97, MaxQueueSize: 1 << 20})
			require.NoError(t, err)
			defer p.Close(context.Background())
			// the first batch holds the publisher
			first := p.Produce(context.Background(), []byte("first"))
			<-g.started
			const workers, each = 8, 3000
			type rec struct {
				f         *Produced
				cancelled func() bool
				key       string
				data      string
			}
			recs := make([][]rec, workers)
			cancels := make([][]context.CancelFunc, workers)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 1))
					shared, cancelShared := context.WithCancel(context.Background())
					cancels[w] = append(cancels[w], cancelShared)
					cancelSharedToo := w%2 == 0
					for i := range each {
						data := fmt.Sprintf("w%d-%d", w, i)
						var ctx context.Context
						var isCancelled func() bool
						switch k := r.IntN(10); {
						case k < 5:
							ctx = shared
							isCancelled = func() bool { return cancelSharedToo }
						case k < 7:
							c, cancel := context.WithCancel(context.Background())
							ctx = c
							cancels[w] = append(cancels[w], cancel)
							if i%2 == 1 {
								cancel() // produced already cancelled: fails at once
							}
							isCancelled = func() bool { return c.Err() != nil }
						case k < 8:
							ctx = zeroCtx{shared}
							isCancelled = func() bool { return cancelSharedToo }
						case k < 9:
							ctx = intCtx(2 * i) // never cancelled
							isCancelled = func() bool { return false }
						default:
							ctx = mapContext{Context: shared, values: map[string]int{"i": i}}
							isCancelled = func() bool { return cancelSharedToo }
						}
						var f *Produced
						key := ""
						if r.IntN(3) == 0 {
							key = "k-" + data
							f = p.ProduceMessage(ctx, Outgoing{Data: []byte(data), Key: key})
						} else if r.IntN(2) == 0 {
							f = p.ProduceMessage(ctx, Outgoing{Data: []byte(data)})
						} else {
							f = p.Produce(ctx, []byte(data))
						}
						recs[w] = append(recs[w], rec{f: f, cancelled: isCancelled, key: key, data: data})
					}
				}()
			}
			wg.Wait()
			for w := range workers {
				if w%2 == 0 {
					cancels[w][0]()
				}
			}
			close(g.gate)
			if withClose {
				require.NoError(t, p.Close(prodCtx(t, prodWait)))
			}
			prodAccepted(t, first)
			for w := range workers {
				for _, r := range recs[w] {
					prodResult(t, r.f)
				}
			}
			g.mu.Lock()
			published := publishedOnce(t, g.got)
			g.mu.Unlock()
			for w := range workers {
				for _, r := range recs[w] {
					_, err := prodResult(t, r.f)
					key, pub := published[r.data]
					if r.cancelled() {
						require.ErrorIs(t, err, context.Canceled, "%s", r.data)
						require.False(t, pub, "%s cancelled but published", r.data)
					} else {
						require.NoError(t, err, "%s", r.data)
						require.True(t, pub, "%s not published", r.data)
						require.Equal(t, r.key, key, "%s published with another key", r.data)
					}
				}
			}
		})
	}
}

// Close gives up on a deep queue held behind a stuck batch: the actor has
// read part of its chain (pend) while Produce kept filling in; every queued
// message fails with ErrClosed, the held batch's with its outcome.
func TestCloseAbandonsDeepQueueInBothChains(t *testing.T) {
	g := &gatedMetaPub{gate: make(chan struct{}), started: make(chan struct{}, 1)}
	p, err := NewBatchingProducer(g, "test-topic", ProducerConfig{BatchSize: 300, MaxQueueSize: 1 << 20})
	require.NoError(t, err)
	base, cancel := context.WithCancel(context.Background())
	defer cancel()
	var futs []*Produced
	for i := range 5000 {
		ctx := context.Context(base)
		if i%3 == 0 {
			ctx = zeroCtx{base}
		}
		if i%4 == 0 {
			futs = append(futs, p.ProduceMessage(ctx, Outgoing{Data: pm(i), Key: fmt.Sprint(i)}))
		} else {
			futs = append(futs, p.Produce(ctx, pm(i)))
		}
		if i == 700 {
			<-g.started
		}
	}
	ctx, cancelClose := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancelClose()
	err = p.Close(ctx)
	require.Error(t, err)
	closed := 0
	for _, f := range futs {
		_, err := prodResult(t, f)
		if err != nil {
			require.ErrorIs(t, err, ErrClosed)
			closed++
		}
	}
	require.Greater(t, closed, 4000)
	g.mu.Lock()
	defer g.mu.Unlock()
	require.Equal(t, len(futs)-closed, len(g.got))
}

// dyingCtx is live for its first Err call (Produce's) and cancelled after:
// the actor must drop exactly the messages produced with one.
type dyingCtx struct {
	context.Context
	n *atomic.Int32
}

func (d dyingCtx) Err() error {
	if d.n.Add(1) == 1 {
		return nil
	}
	return context.Canceled
}

// Producers on many goroutines, while the actor cuts concurrently: messages
// with a dying context (a new one each, pointer or value) between messages
// with shared live ones, keys on some. Exactly the dying ones are dropped.
func TestConcurrentProduceDyingContexts(t *testing.T) {
	m := &messagesPub{mockPub: newMock()}
	m.mockPub.started = nil
	p, err := NewBatchingProducer(m, "test-topic", ProducerConfig{BatchSize: 50, MaxQueueSize: 1 << 20})
	require.NoError(t, err)
	defer p.Close(context.Background())
	const workers, each = 6, 4000
	type rec struct {
		f     *Produced
		dying bool
		key   string
		data  string
	}
	recs := make([][]rec, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			live := []context.Context{context.Background(), context.TODO(), t.Context(), intCtx(2 * w), emptyValCtx{}}
			for i := range each {
				data := fmt.Sprintf("w%d-%d", w, i)
				var ctx context.Context
				dying := r.IntN(4) == 0
				if dying {
					if r.IntN(2) == 0 {
						ctx = dyingCtx{context.Background(), new(atomic.Int32)}
					} else {
						ctx = &dyingCtx{context.Background(), new(atomic.Int32)}
					}
				} else {
					ctx = live[r.IntN(len(live))]
				}
				key := ""
				if r.IntN(3) == 0 {
					key = "k-" + data
				}
				f := p.ProduceMessage(ctx, Outgoing{Data: []byte(data), Key: key})
				recs[w] = append(recs[w], rec{f, dying, key, data})
			}
		}()
	}
	wg.Wait()
	for w := range workers {
		for _, r := range recs[w] {
			prodResult(t, r.f)
		}
	}
	m.mu.Lock()
	published := publishedOnce(t, slices.Concat(m.got...))
	m.mu.Unlock()
	for _, b := range m.recorded() {
		for _, d := range b {
			_, dup := published[d]
			require.False(t, dup)
			published[d] = ""
		}
	}
	for w := range workers {
		for _, r := range recs[w] {
			_, err := prodResult(t, r.f)
			key, pub := published[r.data]
			if r.dying {
				require.ErrorIs(t, err, context.Canceled, r.data)
				require.False(t, pub, r.data)
			} else {
				require.NoError(t, err, r.data)
				require.True(t, pub, r.data)
				require.Equal(t, r.key, key, r.data)
			}
		}
	}
}
