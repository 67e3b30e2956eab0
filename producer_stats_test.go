package pubsub

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestProducerStatsCountEveryOutcome: every produced message is counted
// once, as Pending until its future completes, then as Accepted or under
// its Reason, whether it was refused at Produce or failed with its batch.
func TestProducerStatsCountEveryOutcome(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		switch string(b[0]) {
		case "unavailable":
			return rejected("t", len(b), fmt.Errorf("no owner: %w", ErrTopicUnavailable))
		case "overloaded":
			return rejected("t", len(b), fmt.Errorf("the owner stayed overloaded: %w", ErrQueueFull))
		}
		return acceptAfter(g)(ctx, call, b)
	}
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 1, MaxQueueSize: 2, MaxInFlight: 1, MaxBatchBytes: 64,
		OnPublishError: func(int, error) ErrorDecision { return FailBatchAndContinue }})
	ctx := prodCtx(t, prodWait)
	assert.Equal(t, ProducerStats{}, p.Stats(), "a new producer")

	futs := []*Produced{p.Produce(ctx, pm(0))}
	mp.waitStarted(t) // in flight behind the gate
	futs = append(futs, p.Produce(ctx, pm(1)), p.Produce(ctx, pm(2)))
	p.Produce(ctx, pm(3))             // queue full
	p.Produce(ctx, make([]byte, 100)) // too large
	ended, cancel := context.WithCancel(ctx)
	cancel()
	p.Produce(ended, pm(4)) // ctx already ended
	assert.Equal(t, ProducerStats{
		Rejected:  3,
		ByReason:  map[Reason]uint64{ReasonQueueFull: 1, ReasonTooLarge: 1, ReasonCancelled: 1},
		QueueFull: 1,
		Pending:   3,
		Queued:    2,
	}, p.Stats(), "one batch in flight, two messages queued, three refused")

	g.open()
	for _, f := range futs {
		prodAccepted(t, f)
	}
	failed := p.Produce(ctx, []byte("unavailable"))
	overloaded := p.Produce(ctx, []byte("overloaded"))
	require.NoError(t, p.Flush(ctx))
	_, err := prodDone(t, failed, "the message whose batch failed")
	require.ErrorIs(t, err, ErrTopicUnavailable)
	_, err = prodDone(t, overloaded, "the message an overloaded owner refused")
	require.ErrorIs(t, err, ErrQueueFull)
	require.NoError(t, p.Close(ctx))
	p.Produce(ctx, pm(5)) // closed
	assert.Equal(t, ProducerStats{
		Accepted: 3,
		Rejected: 6,
		// One queue-full refusal is the producer's own, one an owner's.
		ByReason:  map[Reason]uint64{ReasonQueueFull: 2, ReasonTooLarge: 1, ReasonCancelled: 1, ReasonTopicUnavailable: 1, ReasonClosed: 1},
		QueueFull: 1,
	}, p.Stats(), "after Close")
}

// TestProducerStatsCountABurst: after a burst far larger than the queue
// and a Flush, Accepted and Rejected add up to every call, and the
// rejections are the queue-full ones the futures report.
func TestProducerStatsCountABurst(t *testing.T) {
	mp := newMock()
	mp.started = nil // more calls than its buffer holds
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 10, MaxQueueSize: 50})
	ctx := prodCtx(t, prodWait)
	const n = 20_000
	var full uint64
	futs := make([]*Produced, n)
	for i := range futs {
		futs[i] = p.Produce(ctx, pm(i))
	}
	require.NoError(t, p.Flush(ctx))
	for _, f := range futs {
		if _, err, _ := f.Result(); err != nil {
			require.ErrorIs(t, err, ErrQueueFull)
			full++
		}
	}
	st := p.Stats()
	assert.Equal(t, uint64(n), st.Accepted+st.Rejected, "every call counted once: %+v", st)
	assert.Equal(t, full, st.ByReason[ReasonQueueFull], "queue-full futures")
	assert.Equal(t, full, st.QueueFull, "all of them refused by the producer's own queue")
	assert.Equal(t, uint64(len(mp.flat())), st.Accepted, "accepted = published")
	assert.Zero(t, st.Pending)
}

// TestProducerStatsSettledWhenFlushReturns: once Flush returns, its
// messages are counted (Pending zero, all Accepted). The actor counted a
// batch only after completing its futures, so a Flush woken by the last
// one could read Stats first (10 of 10 runs under -race failed).
func TestProducerStatsSettledWhenFlushReturns(t *testing.T) {
	mp := newMock()
	mp.started = nil
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 64, MaxInFlight: 1})
	ctx := prodCtx(t, prodWait)
	var n uint64
	for round := 0; round < 500; round++ {
		for i := 0; i < 64; i++ {
			p.Produce(ctx, pm(i))
			n++
		}
		require.NoError(t, p.Flush(ctx))
		st := p.Stats()
		require.Zero(t, st.Pending, "round %d: %+v", round, st)
		require.Equal(t, n, st.Accepted, "round %d", round)
	}
}
