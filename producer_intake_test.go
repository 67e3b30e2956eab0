package pubsub

import (
	"context"
	"fmt"
	"testing"
	"time"

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
				in.push(intakeEntry{data: pm(i)})
			}
			q := in.take()
			require.True(t, in.empty(), "take leaves the queue empty")
			in.push(intakeEntry{data: []byte("after take")}) // a new chain: q is not written
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
// in every block, with ErrClosed.
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
	for i, f := range futs {
		ack, err := prodDone(t, f, fmt.Sprintf("message %d after Close", i))
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	}
	require.Equal(t, 1, mp.callCount())
}
