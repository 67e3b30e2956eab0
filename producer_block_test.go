package pubsub

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Tests of ProducerConfig.BlockWhenFull: Produce waits for room in a full
// queue instead of failing with ErrQueueFull.

// blockedProducer is a producer with one batch in flight behind a closed
// gate and its queue (MaxQueueSize 2) full, and a Produce call of pm(3)
// blocked on it; done receives that call's future.
type blockedProducer struct {
	p    *BatchingProducer
	mp   *mockPub
	gate *testGate
	futs []*Produced // pm(0) in flight, pm(1) and pm(2) queued
	done chan *Produced
}

func newBlockedProducer(t *testing.T, ctx, blockedCtx context.Context) *blockedProducer {
	t.Helper()
	b := &blockedProducer{mp: newMock(), gate: newTestGate(), done: make(chan *Produced, 1)}
	b.mp.fn = acceptAfter(b.gate)
	b.p = newTestProducer(t, b.mp, ProducerConfig{BatchSize: 1, MaxQueueSize: 2, MaxInFlight: 1, BlockWhenFull: true})
	b.futs = append(b.futs, b.p.Produce(ctx, pm(0)))
	b.mp.waitStarted(t) // in flight: not counted in the queue
	b.futs = append(b.futs, b.p.Produce(ctx, pm(1)), b.p.Produce(ctx, pm(2)))
	go func() { b.done <- b.p.Produce(blockedCtx, pm(3)) }()
	// The call is blocked once it made the room channel (and found no room).
	require.Eventually(t, func() bool {
		b.p.mu.Lock()
		defer b.p.mu.Unlock()
		return b.p.room != nil
	}, prodWait, time.Millisecond, "Produce on a full queue never waited for room")
	select {
	case f := <-b.done:
		ack, err, _ := f.Result()
		t.Fatalf("Produce on a full queue returned at once: ack %+v, err %v", ack, err)
	default:
	}
	return b
}

// blockedResult returns the blocked call's future once Produce returned.
func (b *blockedProducer) blockedResult(t *testing.T, what string) *Produced {
	t.Helper()
	select {
	case f := <-b.done:
		return f
	case <-time.After(prodWait):
		t.Fatalf("%s: Produce still blocked after %v", what, prodWait)
		return nil
	}
}

func TestProducerBlockWhenFullWaitsForRoom(t *testing.T) {
	ctx := prodCtx(t, prodWait)
	b := newBlockedProducer(t, ctx, ctx)
	b.gate.open()
	f := b.blockedResult(t, "the gate opened")
	for _, q := range append(b.futs, f) {
		prodAccepted(t, q)
	}
	assert.Equal(t, []string{string(pm(0)), string(pm(1)), string(pm(2)), string(pm(3))}, b.mp.flat(), "published in produce order")
}

func TestProducerBlockWhenFullEndsWithTheContext(t *testing.T) {
	ctx := prodCtx(t, prodWait)
	blockedCtx, cancel := context.WithCancel(ctx)
	b := newBlockedProducer(t, ctx, blockedCtx)
	cancel()
	ack, err := prodDone(t, b.blockedResult(t, "its ctx was cancelled"), "the blocked message")
	prodExpectErr(t, ack, err, ErrCancelled, ReasonCancelled)
	b.gate.open()
	for _, q := range b.futs {
		prodAccepted(t, q)
	}
	require.NoError(t, b.p.Flush(ctx))
	assert.NotContains(t, b.mp.flat(), string(pm(3)), "a message whose ctx ended while it waited for room was published")
}

func TestProducerBlockWhenFullEndsWithClose(t *testing.T) {
	ctx := prodCtx(t, prodWait)
	b := newBlockedProducer(t, ctx, ctx)
	closed := make(chan error, 1)
	go func() { closed <- b.p.Close(ctx) }() // waits for the gated batch
	ack, err := prodDone(t, b.blockedResult(t, "Close"), "the blocked message")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	b.gate.open()
	require.NoError(t, <-closed, "Close")
	for _, q := range b.futs {
		prodAccepted(t, q)
	}
	assert.NotContains(t, b.mp.flat(), string(pm(3)), "a message refused by Close was published")
}

// TestProducerBlockWhenFullLosesNothing runs producers far faster than a
// slow publisher on a tiny queue: with BlockWhenFull every message is
// accepted, none fails with ErrQueueFull, and each goroutine's messages are
// published in its order.
func TestProducerBlockWhenFullLosesNothing(t *testing.T) {
	mp := newMock()
	mp.started = nil // more calls than its buffer holds
	mp.fn = func(ctx context.Context, _ int, b [][]byte) (PublishAck, error) {
		return PublishAck{Status: Accepted, Messages: len(b), Delivered: 1}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 7, MaxQueueSize: 10, BlockWhenFull: true})
	ctx := prodCtx(t, prodWait)
	const goroutines, each = 4, 2000
	futs := make([][]*Produced, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				futs[g] = append(futs[g], p.Produce(ctx, fmt.Appendf(nil, "g%d-%05d", g, i)))
			}
		})
	}
	wg.Wait()
	require.NoError(t, p.Flush(ctx))
	for g := range goroutines {
		for i, f := range futs[g] {
			ack, err := prodDone(t, f, fmt.Sprintf("goroutine %d, message %d", g, i))
			require.NoError(t, err, "goroutine %d, message %d: ack %+v", g, i, ack)
		}
	}
	published := mp.flat()
	require.Len(t, published, goroutines*each, "every message published once")
	for g := range goroutines {
		var mine []string
		for _, m := range published {
			if m[:3] == fmt.Sprintf("g%d-", g) {
				mine = append(mine, m)
			}
		}
		require.True(t, slices.IsSorted(mine), "goroutine %d's messages were published out of order", g)
	}
}

// TestProducerBlockWhenFullDoesNotLingerOnAFullQueue: a queue smaller than
// a batch cannot fill the batch any further once it is full, so the batch
// goes without waiting for Linger. Before, the pump lingered on a full
// queue: with Linger of a minute the 11th Produce waited the whole minute
// (failed 3 of 3 before, its 2 s ctx ending).
func TestProducerBlockWhenFullDoesNotLingerOnAFullQueue(t *testing.T) {
	mp := newMock()
	mp.started = nil
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 100, MaxQueueSize: 10, Linger: time.Minute, BlockWhenFull: true})
	ctx := prodCtx(t, prodWait)
	// Long enough for the batches to go, far shorter than Linger.
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var futs []*Produced
	for i := range 30 {
		futs = append(futs, p.Produce(short, pm(i)))
	}
	require.NoError(t, p.Flush(ctx))
	for _, f := range futs {
		prodAccepted(t, f)
	}
}

// blockFive fills p's queue (MaxQueueSize 2, one batch in flight on mp)
// and blocks five more Produce calls on it; the returned function waits
// for them and checks that each failed with ErrClosed.
func blockFive(t *testing.T, ctx context.Context, p *BatchingProducer, mp *mockPub) (ended func()) {
	t.Helper()
	p.Produce(ctx, pm(0))
	mp.waitStarted(t)
	p.Produce(ctx, pm(1))
	p.Produce(ctx, pm(2))
	var wg sync.WaitGroup
	res := make(chan *Produced, 5)
	for i := range 5 {
		wg.Go(func() { res <- p.Produce(ctx, pm(10+i)) })
	}
	require.Eventually(t, func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.room != nil }, prodWait, time.Millisecond)
	return func() {
		t.Helper()
		wg.Wait()
		close(res)
		for f := range res {
			_, err := prodResult(t, f)
			require.ErrorIs(t, err, ErrClosed)
		}
	}
}

// TestProducerBlockWhenFullEndsWhenTheProducerStops: Produce calls blocked
// on a full queue return ErrClosed when a batch fails with FailBatchAndStop
// and when Close gives up (abandon), and Stats counts every message once,
// none left Pending.
func TestProducerBlockWhenFullEndsWhenTheProducerStops(t *testing.T) {
	t.Run("FailBatchAndStop", func(t *testing.T) {
		mp := newMock()
		g := newTestGate()
		mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
			if err := g.wait(ctx); err != nil {
				return rejected("test-topic", len(b), err)
			}
			return rejected("test-topic", len(b), errors.New("boom"))
		}
		p := newTestProducer(t, mp, ProducerConfig{BatchSize: 1, MaxQueueSize: 2, MaxInFlight: 1, BlockWhenFull: true,
			OnPublishError: func(int, error) ErrorDecision { return FailBatchAndStop }})
		ctx := prodCtx(t, prodWait)
		ended := blockFive(t, ctx, p, mp)
		g.open()
		ended()
		require.NoError(t, p.Flush(ctx))
		st := p.Stats()
		assert.Zero(t, st.Pending)
		assert.Equal(t, uint64(8), st.Rejected, "%+v", st)
		require.NoError(t, p.Close(ctx))
	})
	t.Run("Close gives up", func(t *testing.T) {
		mp := newMock()
		mp.fn = acceptAfter(newTestGate())
		p := newTestProducer(t, mp, ProducerConfig{BatchSize: 1, MaxQueueSize: 2, MaxInFlight: 1, BlockWhenFull: true})
		ctx := prodCtx(t, prodWait)
		ended := blockFive(t, ctx, p, mp)
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		require.Error(t, p.Close(short))
		ended()
		st := p.Stats()
		assert.Zero(t, st.Pending)
		assert.Equal(t, uint64(8), st.Rejected, "%+v", st)
		assert.Equal(t, uint64(1), st.ByReason[ReasonTimeout], "%+v", st)
	})
}
