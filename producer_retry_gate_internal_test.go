package pubsub

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// gatePub scripts batches by number: batch 1's first attempt is issued and
// fails with an unknown outcome once batch 2 started; batch 2 is not
// issued (its request waits for an owner, as toOwner's loop does) until
// released; everything else is issued at once and accepted. It records
// every other attempt that starts while batch 2 is started and not issued.
type gatePub struct {
	*mockPub
	gmu          sync.Mutex
	attempts     map[uint64]int
	issued2      bool
	started      bool     // batch 2's first attempt
	startedAhead []uint64 // batches of attempts started while batch 2 was not issued
	started2     chan struct{}
	release2     chan struct{}
}

func (g *gatePub) publishBatchIssued(ctx context.Context, topic string, batch msgBatch, o issueOpts) (PublishAck, error) {
	g.gmu.Lock()
	g.attempts[o.seq]++
	n := g.attempts[o.seq]
	if g.started && !g.issued2 {
		g.startedAhead = append(g.startedAhead, o.seq)
	}
	g.gmu.Unlock()
	switch {
	case o.seq == 1 && n == 1:
		o.issued()
		select {
		case <-g.started2:
		case <-ctx.Done():
		}
		return rejected(topic, batch.len(), errors.New("owner did not answer")) // ReasonTimeout: unknown
	case o.seq == 2 && n == 1:
		g.gmu.Lock()
		g.started = true
		g.gmu.Unlock()
		close(g.started2)
		select {
		case <-g.release2:
		case <-ctx.Done():
			return rejected(topic, batch.len(), ctx.Err())
		}
		g.gmu.Lock()
		g.issued2 = true
		g.gmu.Unlock()
		return g.mockPub.do(ctx, topic, batch.data, o.issued)
	}
	return g.mockPub.do(ctx, topic, batch.data, o.issued)
}

// Attempts start in batch order, each once the one before it was issued.
// The gate was one attempt's ID, and a retry took it over from a later
// batch's first attempt not issued yet: once the retry was issued and
// accepted, the batch after that one started ahead of it (found by review;
// with a Node the owner's ORDER_WAIT usually kept the order, not for a
// split batch). Now a retry, as a new batch, starts only once every
// attempt before it was issued, and adds itself to the set.
func TestProducerRetryWaitsForAnUnissuedLaterBatch(t *testing.T) {
	g := &gatePub{mockPub: newMock(), attempts: map[uint64]int{}, started2: make(chan struct{}), release2: make(chan struct{})}
	var once sync.Once
	free := func() { once.Do(func() { close(g.release2) }) }
	failed := make(chan struct{}, 1)
	p := newTestProducer(t, g, ProducerConfig{MaxInFlight: 4, OnPublishError: func(int, error) ErrorDecision {
		select {
		case failed <- struct{}{}:
		default:
		}
		return RetryBatch(0)
	}})
	t.Cleanup(free) // before the producer's Close
	ctx := prodCtx(t, prodWait)

	f1 := p.Produce(ctx, pm(1))
	waitForTest(t, "batch 1 started", func() bool {
		g.gmu.Lock()
		defer g.gmu.Unlock()
		return g.attempts[1] == 1
	})
	f2 := p.Produce(ctx, pm(2)) // batch 2: started once batch 1 was issued, not issued itself
	select {
	case <-g.started2:
	case <-time.After(prodWait):
		t.Fatal("batch 2 not started")
	}
	f3 := p.Produce(ctx, pm(3))
	select {
	case <-failed: // batch 1's first attempt failed, its retry is due now
	case <-time.After(prodWait):
		t.Fatal("batch 1 did not fail")
	}
	ahead := func() []uint64 {
		g.gmu.Lock()
		defer g.gmu.Unlock()
		return append([]uint64(nil), g.startedAhead...)
	}
	// Elapsed time is the point: before the fix the retry, then batch 3,
	// started within a few milliseconds.
	assert.Never(t, func() bool { return len(ahead()) > 0 }, 300*time.Millisecond, 5*time.Millisecond,
		"an attempt started while batch 2, started before it, was not issued")
	free()
	require.NoError(t, p.Flush(ctx))
	prodAccepted(t, f1)
	prodAccepted(t, f2)
	prodAccepted(t, f3)
	assert.Empty(t, ahead(), "an attempt started while batch 2, started before it, was not issued")
}
