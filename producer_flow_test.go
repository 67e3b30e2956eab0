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

func TestProducerLinger(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{Linger: 50 * time.Millisecond, BatchSize: 1000})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 100 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	for _, f := range futs {
		prodAccepted(t, f)
	}
	if n := len(mp.recorded()); n > 3 {
		t.Fatalf("%d batches for 100 messages within the linger, want at most 3", n)
	}
	if got := len(mp.flat()); got != 100 {
		t.Fatalf("published %d", got)
	}
}

func TestProducerLingerFullBatchGoesAtOnce(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{Linger: time.Hour, BatchSize: 10})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 10 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	for _, f := range futs {
		prodAccepted(t, f) // within prodWait, far below the hour of linger
	}
	// A partial batch waits for the linger, unless flushed.
	f := p.Produce(ctx, pm(10))
	select {
	case <-f.Done():
		t.Fatal("a partial batch did not linger")
	case <-time.After(20 * time.Millisecond):
	}
	if err := p.Flush(prodCtx(t, prodWait)); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	prodAccepted(t, f)
}

func TestProducerLingerZeroSendsAtOnce(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	start := time.Now()
	f := p.Produce(ctx, []byte("now"))
	mp.waitStarted(t)
	mp.mu.Lock()
	at := mp.callAt[0]
	mp.mu.Unlock()
	// Generous for a loaded -race run, yet far below any linger worth having.
	if d := at.Sub(start); d > 250*time.Millisecond {
		t.Fatalf("single message published after %v with Linger 0", d)
	}
	prodAccepted(t, f)
}

func TestProducerMaxInFlight(t *testing.T) {
	for _, ordered := range []bool{false, true} {
		t.Run(fmt.Sprintf("ordered=%v", ordered), func(t *testing.T) {
			mp := newMock()
			release := make([]chan struct{}, 100)
			for i := range release {
				release[i] = make(chan struct{})
			}
			mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
				select {
				case <-release[call]:
				case <-ctx.Done():
					return rejected("test-topic", len(b), ctx.Err())
				}
				return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
			}
			var pub Publisher = mp
			if ordered {
				pub = orderedPub{mp}
			}
			p := newTestProducer(t, pub, ProducerConfig{MaxInFlight: 4, BatchSize: 3})
			ctx := prodCtx(t, prodWait)
			var futs []*Produced
			for i := range 30 {
				futs = append(futs, p.Produce(ctx, pm(i)))
			}
			// A publisher that reports issue order gets 4 calls at once;
			// any other one call at a time, so that order holds.
			want := 1
			if ordered {
				want = 4
			}
			for range want {
				mp.waitStarted(t)
			}
			select {
			case c := <-mp.started:
				t.Fatalf("call %d started with %d in flight", c, want)
			case <-time.After(20 * time.Millisecond):
			}
			if peak := mp.peakRunning(); peak != want {
				t.Fatalf("peak concurrent calls = %d, want %d", peak, want)
			}
			if want > 1 {
				// Finish the last one in flight first: its futures must
				// wait for the earlier batches.
				close(release[want-1])
				select {
				case <-futs[len(futs)-1].Done():
					t.Fatal("a later future completed before earlier ones")
				case <-time.After(20 * time.Millisecond):
				}
				for _, f := range futs {
					if _, _, ok := f.Result(); ok {
						t.Fatal("a future completed before the first batch")
					}
				}
			}
			for i := range release {
				if i != want-1 || want == 1 {
					close(release[i])
				}
			}
			// Completion in produce order: when one is done, all before are.
			for i, f := range futs {
				prodAccepted(t, f)
				for j := range i {
					if _, _, ok := futs[j].Result(); !ok {
						t.Fatalf("future %d done before future %d", i, j)
					}
				}
			}
			if peak := mp.peakRunning(); peak > want {
				t.Fatalf("peak concurrent calls = %d, want at most %d", peak, want)
			}
			all := mp.flat()
			if len(all) != 30 {
				t.Fatalf("published %d", len(all))
			}
			for i, s := range all {
				if s != string(pm(i)) {
					t.Fatalf("issue order: message %d = %s", i, s)
				}
			}
		})
	}
}

func TestProducerFlush(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = acceptAfter(g)
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 4})
	ctx := prodCtx(t, prodWait)
	if err := p.Flush(ctx); err != nil {
		t.Fatalf("Flush of an empty producer: %v", err)
	}
	var futs []*Produced
	for i := range 10 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := p.Flush(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Flush with a stuck publisher = %v, want DeadlineExceeded", err)
	}
	g.open()
	if err := p.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	for i, f := range futs {
		if _, err := prodDone(t, f, fmt.Sprintf("message %d after Flush", i)); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
}

func TestProducerInitializeOnce(t *testing.T) {
	ip := &initPub{mockPub: newMock()}
	p := newTestProducer(t, ip, ProducerConfig{MaxInFlight: 3, BatchSize: 2})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 20 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	for _, f := range futs {
		prodAccepted(t, f)
	}
	ip.imu.Lock()
	defer ip.imu.Unlock()
	if ip.inits != 1 || ip.log[0] != "init" {
		t.Fatalf("inits = %d, log %v; want one init before the first batch", ip.inits, ip.log)
	}
}

func TestProducerInitializeFailureIsPublishError(t *testing.T) {
	ip := &initPub{mockPub: newMock()}
	ip.initFn = func(call int) error {
		if call == 0 {
			return ErrTopicUnavailable
		}
		return nil
	}
	var attempts []int
	p := newTestProducer(t, ip, ProducerConfig{OnPublishError: func(attempt int, err error) ErrorDecision {
		if !errors.Is(err, ErrTopicUnavailable) {
			t.Errorf("policy got %v", err)
		}
		attempts = append(attempts, attempt) // the producer goroutine only
		return RetryBatch(0)
	}})
	ctx := prodCtx(t, prodWait)
	prodAccepted(t, p.Produce(ctx, []byte("x")))
	prodAccepted(t, p.Produce(ctx, []byte("y")))
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	ip.imu.Lock()
	defer ip.imu.Unlock()
	if !slices.Equal(ip.log, []string{"init", "init", "batch", "batch"}) {
		t.Fatalf("calls %v, want [init init batch batch]", ip.log)
	}
	if !slices.Equal(attempts, []int{1}) {
		t.Fatalf("attempts %v, want [1]", attempts)
	}
}

func TestProducerInitializeFailureStops(t *testing.T) {
	ip := &initPub{mockPub: newMock()}
	ip.initFn = func(int) error { return ErrTopicUnavailable }
	p := newTestProducer(t, ip, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	ack, err := prodResult(t, p.Produce(ctx, []byte("x")))
	prodExpectErr(t, ack, err, ErrTopicUnavailable, ReasonTopicUnavailable)
	if n := ip.callCount(); n != 0 {
		t.Fatalf("%d publish calls after a failed Initialize", n)
	}
}

func TestProducerProducedWait(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		_ = g.wait(ctx)
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	f := p.Produce(ctx, []byte("x"))
	if _, _, ok := f.Result(); ok {
		t.Fatal("Result ok before completion")
	}
	short, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	ack, err := f.Wait(short)
	prodExpectErr(t, ack, err, context.DeadlineExceeded, ReasonTimeout)
	g.open()
	ack, err = f.Wait(ctx)
	if err != nil || ack.Status != Accepted {
		t.Fatalf("Wait = %+v, %v", ack, err)
	}
	d1, d2 := f.Done(), f.Done()
	if d1 != d2 {
		t.Fatal("Done returns different channels")
	}
}

func TestProducerConcurrentProduce(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 50, MaxInFlight: 2})
	ctx := prodCtx(t, prodWait)
	const workers, each = 8, 500
	var wg sync.WaitGroup
	futs := make([][]*Produced, workers)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				futs[w] = append(futs[w], p.Produce(ctx, []byte(fmt.Sprintf("w%d-%05d", w, i))))
			}
		})
	}
	wg.Wait()
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, fs := range futs {
		for _, f := range fs {
			if _, err := prodDone(t, f, "after Close"); err != nil {
				t.Fatal(err)
			}
		}
	}
	seen := map[string]bool{}
	for _, s := range mp.flat() {
		if seen[s] {
			t.Fatalf("%s published twice", s)
		}
		seen[s] = true
	}
	if len(seen) != workers*each {
		t.Fatalf("published %d distinct, want %d", len(seen), workers*each)
	}
}

// TestProducerProduceAllocs checks that Produce costs no allocation per
// message beyond amortised slabs and queue growth.
func TestProducerProduceAllocs(t *testing.T) {
	if testing.Short() {
		t.Skip()
	}
	mp := newMock()
	// Nothing is sent while measuring: only Produce's own allocations count.
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 100_000, Linger: time.Hour, MaxQueueSize: 1 << 20})
	ctx := context.Background()
	data := []byte("payload")
	for range 1000 { // grow the queue first
		p.Produce(ctx, data)
	}
	allocs := testing.AllocsPerRun(1000, func() { p.Produce(ctx, data) })
	if allocs > 0.1 {
		t.Fatalf("Produce allocates %.2f times per message", allocs)
	}
}

// Each batch carries the producer's ID and a number that grows with each
// batch and stays the same across the batch's retries: subscriber nodes use
// it to keep the producer's order and drop retried copies.
func TestProducerNumbersBatchesForOrdering(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, batch [][]byte) (PublishAck, error) {
		if call == 1 { // the second call fails once
			return PublishAck{Status: Rejected, Reason: ReasonTimeout}, ErrTimeout
		}
		return PublishAck{Status: Accepted, Messages: len(batch)}, nil
	}
	// One batch at a time, so that the retry comes before the third batch.
	p := newTestProducer(t, orderedPub{mp}, ProducerConfig{BatchSize: 1, MaxInFlight: 1,
		OnPublishError: func(int, error) ErrorDecision { return RetryBatch(time.Millisecond) }})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := 0; i < 3; i++ {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	for _, f := range futs {
		prodAccepted(t, f)
	}
	mp.mu.Lock()
	defer mp.mu.Unlock()
	if len(mp.origins) != 4 {
		t.Fatalf("%d calls, want 4 (3 batches, one retried)", len(mp.origins))
	}
	seqs := []uint64{}
	for _, o := range mp.origins {
		if o.producer == "" || o.producer != mp.origins[0].producer {
			t.Fatalf("origins %+v: want one non-empty producer ID", mp.origins)
		}
		seqs = append(seqs, o.seq)
	}
	if seqs[0] >= seqs[1] || seqs[1] != seqs[2] || seqs[2] >= seqs[3] {
		t.Fatalf("batch numbers %v: want increasing, the retry keeping its number", seqs)
	}
}

// A batch counts against MaxInFlight until its futures complete: while the
// oldest batch is stuck, the batches resolved behind it wait in order and
// no further batch starts, so a stuck publish cannot let the producer's
// memory grow past MaxInFlight batches and MaxQueueSize messages.
func TestProducerStuckBatchBoundsTheBatchesBehindIt(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			if err := g.wait(ctx); err != nil {
				return rejected("test-topic", len(b), err)
			}
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, orderedPub{mp}, ProducerConfig{BatchSize: 1, MaxInFlight: 3})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 20 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	waitForTest(t, "3 batches in flight", func() bool { return mp.callCount() >= 3 })
	// Batches 1 and 2 are answered at once; before the fix, 17 more batches
	// started behind the stuck one within microseconds.
	assert.Never(t, func() bool { return mp.callCount() > 3 }, 200*time.Millisecond, 5*time.Millisecond,
		"batches started while the oldest was stuck")
	for _, f := range futs {
		_, _, done := f.Result()
		require.False(t, done, "a future completed before the stuck batch ahead of it")
	}
	g.open()
	for _, f := range futs {
		prodAccepted(t, f)
	}
	require.Len(t, mp.flat(), 20)
}
