package pubsub

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A batch whose every message's context ended before the cut is never
// sent. It was numbered all the same, so the next batch named it as its
// predecessor, and an owner that accepted the batch before it (the same
// owner, nothing moved) held that one back (mustWaitFor) until the
// producer's earlier batches settled: a stall at AckDelivered and
// AckAccepted, and at AckNone, where nobody hears the ORDER_WAIT, a lost
// batch whose futures completed Accepted (found by review). An unsent
// batch now takes no number.

// orderOwnerPub models one topic owner as topicActor.producerMustWait and
// producerServed do: it remembers the last batch it accepted and holds back (records in
// held) a batch that mustWaitFor says to hold. A held batch is answered
// as an AckNone owner's refusal reaches its publisher: not at all, the
// call returns Accepted. hold delays the answer of a batch (its
// subscribers are slow, or for AckNone, the attempt's goroutine has not
// reported yet).
type orderOwnerPub struct {
	*mockPub
	omu  sync.Mutex
	last uint64
	held []uint64
	hold map[uint64]chan struct{}
}

func (o *orderOwnerPub) publishBatchIssued(ctx context.Context, topic string, batch msgBatch, opts issueOpts) (PublishAck, error) {
	origin := batchOrigin{producer: opts.producer, seq: opts.seq, prev: opts.prev, settled: opts.settled()}
	o.omu.Lock()
	wait := origin.mustWaitFor(o.last)
	if wait {
		o.held = append(o.held, opts.seq)
	} else {
		o.last = max(o.last, opts.seq<<16) // as origin.seq: batch<<16|chunk
	}
	ch := o.hold[opts.seq]
	o.omu.Unlock()
	if wait {
		opts.issued()
		return PublishAck{Topic: topic, Status: Accepted, Messages: batch.len()}, nil
	}
	if ch == nil {
		return o.mockPub.do(ctx, topic, batch.data, opts.issued)
	}
	opts.issued()
	select {
	case <-ch:
	case <-ctx.Done():
		return rejected(topic, batch.len(), ctx.Err())
	}
	return o.mockPub.do(ctx, topic, batch.data, nil)
}

func (o *orderOwnerPub) heldBatches() []uint64 {
	o.omu.Lock()
	defer o.omu.Unlock()
	return append([]uint64(nil), o.held...)
}

func TestProducerBatchAfterAnAllCancelledOneIsNotHeldBack(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	op := &orderOwnerPub{mockPub: newMock(), hold: map[uint64]chan struct{}{1: release}}
	p := newTestProducer(t, op, ProducerConfig{MaxInFlight: 4, Linger: 50 * time.Millisecond})
	bg := prodCtx(t, prodWait)

	f1 := p.Produce(bg, pm(1)) // batch 1: sent, its answer outstanding
	waitForTest(t, "batch 1 accepted by the owner", func() bool {
		op.omu.Lock()
		defer op.omu.Unlock()
		return op.last == 1<<16
	})

	ctx2, cancel2 := context.WithCancel(bg)
	f2 := p.Produce(ctx2, pm(2)) // batch 2: every message cancelled before the cut
	cancel2()
	waitForTest(t, "batch 2 cut", func() bool { return p.Stats().Queued == 0 })

	f3 := p.Produce(bg, pm(3)) // batch 3: sent to the owner that accepted batch 1
	waitForTest(t, "batch 3 sent", func() bool {
		op.omu.Lock()
		defer op.omu.Unlock()
		return op.last == 2<<16 || len(op.held) > 0 // the second batch sent
	})
	held := op.heldBatches()
	free()
	require.NoError(t, p.Flush(bg))

	_, err := prodResult(t, f2)
	assert.ErrorIs(t, err, context.Canceled)
	prodAccepted(t, f1)
	prodAccepted(t, f3)
	assert.Empty(t, held, "the owner that accepted batch 1 held the next batch sent back for the cancelled one, which was never sent "+
		"(prev names an unsent batch): at AckNone that batch is lost with an Accepted future")
}

// holdSecondPublish holds the second OnPublish call (a producer attempt
// that already wrote its request and opened the gate, before it reports
// its result to the producer's actor) until released: it only widens the
// window in which the attempt goroutine has not reported yet, which a
// descheduled goroutine opens as well.
type holdSecondPublish struct {
	calls   atomic.Int32
	entered chan struct{}
	release chan struct{}
}

func (h *holdSecondPublish) OnPublish(PublishInfo) {
	if h.calls.Add(1) != 2 {
		return
	}
	close(h.entered)
	select {
	case <-h.release:
	case <-time.After(10 * time.Second):
	}
}

// The same at AckNone on real nodes, one owner throughout: the batch after
// the cancelled one was refused by the owner (AckNoneRefused), its future
// Accepted, and the subscriber never got it.
func TestProducerAckNoneDeliversTheBatchAfterAnAllCancelledOne(t *testing.T) {
	hook := &holdSecondPublish{entered: make(chan struct{}), release: make(chan struct{})}
	var once sync.Once
	free := func() { once.Do(func() { close(hook.release) }) }
	t.Cleanup(free)
	owner, pub := ownerAndPublisher(t, WithHooks(hook))
	topic := ownedTopics(pub, "owner", "review-acknone", 1)[0]

	var mu sync.Mutex
	var got []string
	_, err := owner.Subscribe(t.Context(), topic, func(_ context.Context, m *Message) error {
		mu.Lock()
		got = append(got, string(m.Data))
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	received := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), got...)
	}

	p, err := NewBatchingProducer(pub, topic, ProducerConfig{AckLevel: AckNone, MaxInFlight: 4, Linger: 50 * time.Millisecond})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Close(ctx)
	})
	t.Cleanup(free) // before the producer's Close
	bg, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	_, err = p.Produce(bg, []byte("m1")).Wait(bg) // batch 1 (initializes the topic)
	require.NoError(t, err)
	waitForTest(t, "m1 delivered", func() bool { return len(received()) == 1 })

	f2 := p.Produce(bg, []byte("m2")) // batch 2: written, its attempt not reported yet
	select {
	case <-hook.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("batch 2 not published")
	}

	ctx3, cancel3 := context.WithCancel(bg)
	f3 := p.Produce(ctx3, []byte("m3")) // batch 3: cancelled before the cut
	cancel3()
	waitForTest(t, "batch 3 cut", func() bool { return p.Stats().Queued == 0 })

	f4 := p.Produce(bg, []byte("m4")) // sent while batch 2's report is held
	waitForTest(t, "m4 delivered or refused by the owner", func() bool {
		return len(received()) == 3 || owner.Stats().AckNoneRefused > 0
	})
	free()
	require.NoError(t, p.Flush(bg))

	_, err = f2.Wait(bg)
	require.NoError(t, err)
	_, err = f3.Wait(bg)
	require.ErrorIs(t, err, context.Canceled)
	ack4, err4 := f4.Wait(bg)
	require.NoError(t, err4, "m4's future")
	assert.Equal(t, Accepted, ack4.Status)

	assert.Equal(t, []string{"m1", "m2", "m4"}, received(), "m4's future says Accepted; the subscriber must get it")
	assert.Zero(t, owner.Stats().AckNoneRefused, "the owner refused (lost) a batch of the producer although nothing moved")
}
