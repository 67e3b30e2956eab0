package pubsub

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestProducerCancelledBeforeSend(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			_ = g.wait(ctx)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	f0 := p.Produce(ctx, []byte("a"))
	mp.waitStarted(t)
	mctx, cancel := context.WithCancel(ctx)
	f1 := p.Produce(mctx, []byte("cancelled"))
	f2 := p.Produce(ctx, []byte("c"))
	cancel()
	g.open()
	prodAccepted(t, f0)
	ack, err := prodResult(t, f1)
	prodExpectErr(t, ack, err, context.Canceled, ReasonCancelled)
	prodAccepted(t, f2)
	if got := mp.flat(); !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("published %v, want [a c]", got)
	}

	// Already cancelled at Produce: done at once.
	ack, err = prodDone(t, p.Produce(mctx, []byte("late")), "cancelled ctx")
	prodExpectErr(t, ack, err, context.Canceled, ReasonCancelled)

	// A deadline also drops the message, still as ReasonCancelled.
	dctx, dcancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer dcancel()
	ack, err = prodDone(t, p.Produce(dctx, []byte("expired")), "expired ctx")
	prodExpectErr(t, ack, err, context.DeadlineExceeded, ReasonCancelled)
}

func TestProducerAllCancelledBatchNotSent(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			_ = g.wait(ctx)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	f0 := p.Produce(ctx, []byte("first"))
	mp.waitStarted(t)
	mctx, cancel := context.WithCancel(ctx)
	var futs []*Produced
	for i := range 10 {
		futs = append(futs, p.Produce(mctx, pm(i)))
	}
	cancel()
	g.open()
	prodAccepted(t, f0)
	for _, f := range futs {
		ack, err := prodResult(t, f)
		prodExpectErr(t, ack, err, context.Canceled, ReasonCancelled)
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := mp.callCount(); n != 1 {
		t.Fatalf("%d publish calls, want 1 (the all-cancelled batch must not be sent)", n)
	}
}

func TestProducerRetryThenSuccess(t *testing.T) {
	mp := newMock()
	const fails = 3
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call < fails {
			return rejected("test-topic", len(b), fmt.Errorf("owner moving: %w", ErrTopicUnavailable))
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	var mu sync.Mutex
	var attempts []int
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(attempt int, err error) ErrorDecision {
		if !errors.Is(err, ErrTopicUnavailable) {
			t.Errorf("policy got %v, want ErrTopicUnavailable", err)
		}
		mu.Lock()
		attempts = append(attempts, attempt)
		mu.Unlock()
		return RetryBatch(time.Millisecond)
	}})
	ctx := prodCtx(t, prodWait)
	prodAccepted(t, p.Produce(ctx, []byte("x")))
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(attempts, []int{1, 2, 3}) {
		t.Fatalf("attempts = %v, want [1 2 3]", attempts)
	}
	if n := mp.callCount(); n != fails+1 {
		t.Fatalf("%d calls, want %d", n, fails+1)
	}
}

func TestProducerFailBatchAndContinue(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			_ = g.wait(ctx)
			return rejected("test-topic", len(b), ErrTimeout)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(int, error) ErrorDecision { return FailBatchAndContinue }})
	ctx := prodCtx(t, prodWait)
	f0 := p.Produce(ctx, []byte("a"))
	mp.waitStarted(t)
	f1 := p.Produce(ctx, []byte("b"))
	g.open()
	ack, err := prodResult(t, f0)
	prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
	prodAccepted(t, f1)
	prodAccepted(t, p.Produce(ctx, []byte("c")))
}

func TestProducerFailBatchAndStop(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		_ = g.wait(ctx)
		return rejected("test-topic", len(b), ErrTopicUnavailable)
	}
	p := newTestProducer(t, mp, ProducerConfig{}) // default policy: stop
	ctx := prodCtx(t, prodWait)
	f0 := p.Produce(ctx, []byte("a"))
	mp.waitStarted(t)
	var queued []*Produced
	for i := range 10 {
		queued = append(queued, p.Produce(ctx, pm(i)))
	}
	g.open()
	ack, err := prodResult(t, f0)
	prodExpectErr(t, ack, err, ErrTopicUnavailable, ReasonTopicUnavailable)
	for _, f := range queued {
		ack, err := prodResult(t, f)
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
		if !errors.Is(err, ErrTopicUnavailable) {
			t.Fatalf("queued failure %v does not wrap the cause", err)
		}
	}
	ack, err = prodDone(t, p.Produce(ctx, []byte("late")), "after stop")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	if err := p.Close(ctx); err != nil {
		t.Fatalf("Close after stop: %v", err)
	}
	if n := mp.callCount(); n != 1 {
		t.Fatalf("%d calls, want 1", n)
	}
}

func TestProducerPublisherClosedStops(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		return rejected("test-topic", len(b), ErrClosed)
	}
	called := false
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(int, error) ErrorDecision {
		called = true
		return RetryBatch(0)
	}})
	ctx := prodCtx(t, prodWait)
	ack, err := prodResult(t, p.Produce(ctx, []byte("a")))
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	ack, err = prodDone(t, p.Produce(ctx, []byte("b")), "after publisher closed")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	if called {
		t.Fatal("policy consulted for a closed publisher")
	}
}

func TestProducerPermanentRejectionSkipsPolicy(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			return rejected("test-topic", len(b), ErrTooLarge)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(int, error) ErrorDecision {
		t.Error("policy consulted for ErrTooLarge")
		return FailBatchAndStop
	}})
	ctx := prodCtx(t, prodWait)
	ack, err := prodResult(t, p.Produce(ctx, []byte("a")))
	prodExpectErr(t, ack, err, ErrTooLarge, ReasonTooLarge)
	prodAccepted(t, p.Produce(ctx, []byte("b")))
}

func TestProducerInconsistentPublisherNormalized(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		switch call {
		case 0: // error with an Accepted ack
			return PublishAck{Status: Accepted}, errors.New("boom")
		default: // Rejected ack without an error
			return PublishAck{Status: Rejected, Reason: ReasonTopicUnavailable}, nil
		}
	}
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(int, error) ErrorDecision { return FailBatchAndContinue }})
	ctx := prodCtx(t, prodWait)
	ack, err := prodResult(t, p.Produce(ctx, []byte("a")))
	prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
	ack, err = prodResult(t, p.Produce(ctx, []byte("b")))
	prodExpectErr(t, ack, err, ErrTopicUnavailable, ReasonTopicUnavailable)
	if ack.Topic != "test-topic" {
		t.Fatalf("ack topic %q", ack.Topic)
	}
}

func TestProducerCloseWhileRetryingForever(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		return rejected("test-topic", len(b), ErrTopicUnavailable)
	}
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 2, OnPublishError: func(int, error) ErrorDecision { return RetryBatch(time.Millisecond) }})
	ctx := prodCtx(t, prodWait)
	var futs []*Produced
	for i := range 6 {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	for range 3 { // a few attempts of the first batch
		mp.waitStarted(t)
	}
	cctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := p.Close(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Close took %v", d)
	}
	for i, f := range futs {
		ack, err := prodDone(t, f, fmt.Sprintf("message %d", i))
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	}
	rec := mp.recorded()
	for _, b := range rec {
		if !slices.Equal(b, rec[0]) {
			t.Fatalf("batch %v was published while %v was being retried", b, rec[0])
		}
	}
}

// A retry after an attempt whose outcome is unknown (it timed out) sends
// the same messages, "b" included although its context ended: leaving it
// out would split a large batch at other boundaries, and subscribers that
// ran a chunk of the failed attempt would answer the retry's chunk of the
// same number without running it (TestSplitProducerBatchRetry*). "b"
// completes with the batch's outcome.
func TestProducerRetryAfterAnUnknownOutcomeKeepsCancelled(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		switch call {
		case 0:
			_ = g.wait(ctx)
			return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
		case 1:
			return rejected("test-topic", len(b), ErrTimeout)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	ctx := prodCtx(t, prodWait)
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(attempt int, err error) ErrorDecision {
		cancel() // the caller gives up on "b" while its batch waits for the retry
		return RetryBatch(0)
	}})
	f0 := p.Produce(ctx, []byte("first"))
	mp.waitStarted(t)
	fa := p.Produce(ctx, []byte("a"))
	fb := p.Produce(mctx, []byte("b"))
	fc := p.Produce(ctx, []byte("c"))
	g.open()
	prodAccepted(t, f0)
	prodAccepted(t, fa)
	prodAccepted(t, fb)
	prodAccepted(t, fc)
	got := mp.recorded()
	want := [][]string{{"first"}, {"a", "b", "c"}, {"a", "b", "c"}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("batches %v, want %v", got, want)
	}
}

// A retry after an attempt the owner definitely did not take (no owner):
// a message left out of it was never published, ReasonCancelled.
func TestProducerRetryLeavesOutCancelledAfterARefusal(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			return rejected("test-topic", len(b), ErrTopicUnavailable)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	ctx := prodCtx(t, prodWait)
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(attempt int, err error) ErrorDecision {
		cancel()
		return RetryBatch(0)
	}})
	fb := p.Produce(mctx, []byte("b"))
	fc := p.Produce(ctx, []byte("c"))
	ack, err := prodResult(t, fb)
	prodExpectErr(t, ack, err, context.Canceled, ReasonCancelled)
	prodAccepted(t, fc)
}

func TestProducerPublishTimeout(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		<-ctx.Done()
		return PublishAck{}, ctx.Err() // a careless publisher: plain ctx error
	}
	errs := make(chan error, 1)
	p := newTestProducer(t, mp, ProducerConfig{PublishTimeout: 20 * time.Millisecond, OnPublishError: func(attempt int, err error) ErrorDecision {
		errs <- err
		return FailBatchAndContinue
	}})
	ctx := prodCtx(t, prodWait)
	ack, err := prodResult(t, p.Produce(ctx, []byte("x")))
	prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want it to wrap context.DeadlineExceeded", err)
	}
	perr := <-errs
	if !errors.Is(perr, context.DeadlineExceeded) && !errors.Is(perr, ErrTimeout) {
		t.Fatalf("policy saw %v, want a timeout", perr)
	}
}
