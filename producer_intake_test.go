package pubsub

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The intake queue hands entries back in push order across block
// boundaries, and clears each slot it reads so that a queued message's
// bytes, context and future are not kept alive by a block.
func TestIntakeQueueKeepsOrderAcrossBlocks(t *testing.T) {
	for _, n := range []int{0, 1, intakeBlockLen - 1, intakeBlockLen, intakeBlockLen + 1, 3*intakeBlockLen + 7} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var in intakeQueue
			for i := range n {
				in.push(queuedMessage{data: pm(i)})
			}
			q := in.take()
			require.True(t, in.empty(), "take leaves the queue empty")
			in.push(queuedMessage{data: []byte("after take")}) // a new chain: q is not written
			for i := range n {
				require.False(t, q.empty(), "entry %d missing", i)
				h, r := q.head, q.head.r
				require.Equal(t, string(pm(i)), string(q.front().data))
				q.pop()
				if q.head == h { // the block is still queued: its slot was cleared
					assert.Nil(t, h.e[r].data, "slot %d kept its bytes after pop", r)
				}
			}
			assert.True(t, q.empty(), "entries left after %d pops", n)
			assert.Nil(t, q.tail)
			require.Equal(t, "after take", string(in.front().data))
		})
	}
}

// mapContext is a context type that is not comparable: == between two
// of them, held by value in context.Context interfaces, panics.
type mapContext struct {
	context.Context
	values map[string]int
}

// A block keeps a context once per run of entries produced with the same
// one, and keys and headers only for the entries that have them; reading
// gives every entry back what it was pushed with, across block
// boundaries, and drops each run's context once read past it. A context
// type that is not comparable starts a run of its own instead of
// panicking.
func TestIntakeQueueGivesEveryEntryItsContextAndMeta(t *testing.T) {
	a, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	b, cancelB := context.WithCancel(context.Background())
	defer cancelB()
	odd1 := context.Context(mapContext{Context: a, values: map[string]int{"x": 1}})
	odd2 := context.Context(mapContext{Context: a, values: map[string]int{"x": 1}})
	n := 2*intakeBlockLen + 5
	pushed := make([]queuedMessage, n)
	for i := range pushed {
		m := queuedMessage{data: pm(i), fut: new(Produced)}
		switch {
		case i%7 == 3:
			m.ctx = b
		case i == intakeBlockLen-1 || i == intakeBlockLen+10:
			m.ctx = odd1
		case i == intakeBlockLen+11:
			m.ctx = odd2
		default:
			m.ctx = a
		}
		if i%5 == 0 {
			m.meta = &wire.Meta{Key: fmt.Sprint("k", i)}
		}
		pushed[i] = m
	}
	var in intakeQueue
	require.NotPanics(t, func() {
		for _, m := range pushed {
			in.push(m)
		}
	})
	require.Len(t, in.head.ctxs, 2*(intakeBlockLen/7)+2, "one run per change of context in the first block")
	q := in.take()
	for i, want := range pushed {
		require.False(t, q.empty(), "entry %d missing", i)
		got := q.front()
		require.Equal(t, string(want.data), string(got.data), "entry %d", i)
		require.Same(t, want.fut, got.fut, "entry %d", i)
		require.True(t, sameContext(want.ctx, got.ctx), "entry %d has another context", i)
		require.Same(t, want.meta, got.meta, "entry %d", i)
		h, cr := q.head, q.head.cr
		q.pop()
		if q.head == h && h.cr > cr {
			assert.Nil(t, h.ctxs[cr].ctx, "a run read past keeps its context")
		}
	}
	assert.True(t, q.empty())
}

// Produce with a context type that is not comparable, one value per call,
// queues and publishes every message in order (comparing two such
// contexts with == would panic inside Produce).
func TestProduceWithContextsThatAreNotComparable(t *testing.T) {
	mp := newMock()
	// Not newTestProducer: its cleanup would wait on the producer's mutex
	// if Produce panicked while holding it, where the panic should fail the
	// test at once.
	p, err := NewBatchingProducer(mp, "test-topic", ProducerConfig{})
	require.NoError(t, err)
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 5 {
		futs = append(futs, p.Produce(mapContext{Context: ctx, values: map[string]int{"i": i}}, pm(i)))
	}
	require.NoError(t, p.Close(ctx))
	for _, f := range futs {
		prodAccepted(t, f)
	}
	got := mp.flat()
	require.Len(t, got, 5)
	for i, m := range got {
		require.Equal(t, string(pm(i)), m)
	}
}

// A queue many blocks deep is published whole and in order once the
// publisher frees up, and MaxQueueSize still bounds it.
func TestProducerDeepQueueKeepsOrder(t *testing.T) {
	const queued = 5*intakeBlockLen + 3
	mp := newMock()
	g := newTestGate()
	mp.fn = acceptAfter(g)
	p := newTestProducer(t, mp, ProducerConfig{MaxQueueSize: queued})
	ctx := prodCtx(t, prodWait)
	futs := []*Produced{p.Produce(ctx, pm(0))}
	mp.waitStarted(t) // in flight: the rest queues behind it
	for i := 1; i <= queued; i++ {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	ack, err := prodDone(t, p.Produce(ctx, pm(queued+1)), "queue full")
	prodExpectErr(t, ack, err, ErrQueueFull, ReasonQueueFull)
	g.open()
	require.NoError(t, p.Flush(ctx))
	for _, f := range futs {
		prodAccepted(t, f)
	}
	got := mp.flat()
	require.Len(t, got, queued+1)
	for i, m := range got {
		require.Equal(t, string(pm(i)), m, "message %d out of order", i)
	}
}

// Close with a deep queue and a stuck publisher fails every queued message,
// in every block, with ErrClosed (ReasonClosed: never sent); the message in
// flight gets ReasonTimeout (outcome unknown), its error wrapping ErrClosed.
func TestProducerCloseFailsDeepQueue(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		<-ctx.Done() // stuck until cancelled
		return rejected("test-topic", len(b), ctx.Err())
	}
	p := newTestProducer(t, mp, ProducerConfig{PublishTimeout: time.Hour, MaxInFlight: 1})
	ctx := prodCtx(t, prodWait)
	futs := []*Produced{p.Produce(ctx, pm(0))}
	mp.waitStarted(t)
	for i := 1; i < 3*intakeBlockLen; i++ {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	cctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, p.Close(cctx), context.DeadlineExceeded)
	ack, err := prodDone(t, futs[0], "the in-flight message after Close")
	prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
	require.ErrorIs(t, err, ErrClosed)
	for i, f := range futs[1:] {
		ack, err := prodDone(t, f, fmt.Sprintf("message %d after Close", i+1))
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	}
	require.Equal(t, 1, mp.callCount())
}
