package pubsub

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"
)

// The default PublishTimeout outlives the publisher's own wait when it
// reports one (a *Node: SubscriberTimeout + RequestTimeout), so a blocked
// subscriber cannot time the producer's attempts out (issue finding 4).
func TestProducerDefaultPublishTimeout(t *testing.T) {
	cases := []struct {
		name     string
		pub      Publisher
		explicit time.Duration
		want     time.Duration
	}{
		{"waiter, zero", waitPub{newMock(), 1300 * time.Millisecond}, 0, 2300 * time.Millisecond},
		{"waiter with the node defaults, zero", waitPub{newMock(), DefaultSubscriberTimeout + DefaultRequestTimeout}, 0, 11 * time.Second},
		{"waiter, explicit", waitPub{newMock(), 10 * time.Second}, 3 * time.Second, 3 * time.Second},
		{"waiter reporting no wait, zero", waitPub{newMock(), 0}, 0, DefaultPublishTimeout},
		{"custom publisher, zero", newMock(), 0, DefaultPublishTimeout},
		{"custom publisher, explicit", newMock(), 42 * time.Millisecond, 42 * time.Millisecond},
	}
	for _, c := range cases {
		p := newTestProducer(t, c.pub, ProducerConfig{PublishTimeout: c.explicit})
		if p.cfg.PublishTimeout != c.want {
			t.Errorf("%s: PublishTimeout = %v, want %v", c.name, p.cfg.PublishTimeout, c.want)
		}
	}
	if DefaultPublishTimeout != 11*time.Second {
		t.Errorf("DefaultPublishTimeout = %v, want 11s (the default node's wait + 1s)", DefaultPublishTimeout)
	}
	// *Node reports the wait publishChunk gives one attempt, which
	// outlives the owner's wait for a remote node's report.
	n := &Node{cfg: Config{SubscriberTimeout: 300 * time.Millisecond, RequestTimeout: time.Second}}
	if got := n.publishWait(); got != 1300*time.Millisecond {
		t.Errorf("Node.publishWait() = %v, want 1.3s", got)
	}
	if owner := n.cfg.SubscriberTimeout + n.cfg.RequestTimeout/2; n.publishWait() <= owner {
		t.Errorf("Node.publishWait() = %v does not outlive the owner's wait %v", n.publishWait(), owner)
	}
	if got := defaultPublishTimeout(n); got != 2300*time.Millisecond {
		t.Errorf("default PublishTimeout for a *Node = %v, want its wait + 1s = 2.3s", got)
	}
}

func TestProducerConfigValidation(t *testing.T) {
	mp := newMock()
	cases := []struct {
		name string
		cfg  ProducerConfig
	}{
		{"BatchSize", ProducerConfig{BatchSize: -1}},
		{"MaxBatchBytes", ProducerConfig{MaxBatchBytes: -1}},
		{"Linger", ProducerConfig{Linger: -time.Millisecond}},
		{"MaxQueueSize", ProducerConfig{MaxQueueSize: -1}},
		{"PublishTimeout", ProducerConfig{PublishTimeout: -time.Second}},
		{"MaxInFlight", ProducerConfig{MaxInFlight: -2}},
	}
	for _, c := range cases {
		p, err := NewBatchingProducer(mp, "ok", c.cfg)
		if !errors.Is(err, ErrInvalidConfig) || p != nil {
			t.Errorf("%s negative: got %v, %v; want ErrInvalidConfig", c.name, p, err)
		}
	}
	for _, topic := range []string{"", "has space", "a\x00b"} {
		if _, err := NewBatchingProducer(mp, topic, ProducerConfig{}); !errors.Is(err, ErrInvalidTopic) {
			t.Errorf("topic %q: err = %v, want ErrInvalidTopic", topic, err)
		}
	}
	if _, err := NewBatchingProducer(nil, "ok", ProducerConfig{}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("nil publisher: err = %v, want ErrInvalidConfig", err)
	}
	if _, err := NewBatchingProducer((*Node)(nil), "ok", ProducerConfig{}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("nil *Node: err = %v, want ErrInvalidConfig", err)
	}

	p := newTestProducer(t, mp, ProducerConfig{})
	c := p.cfg
	if c.BatchSize != 2000 || c.MaxBatchBytes != 1<<20-64<<10 || c.Linger != 0 || c.MaxQueueSize != 100_000 ||
		c.PublishTimeout != DefaultPublishTimeout || c.MaxInFlight != 4 {
		t.Errorf("defaults = %+v", c)
	}
	if c.OnPublishError == nil || c.OnPublishError(1, errors.New("x")) != FailBatchAndStop {
		t.Errorf("default OnPublishError does not return FailBatchAndStop")
	}
	if p.Topic() != "test-topic" {
		t.Errorf("Topic() = %q", p.Topic())
	}

	sp := sizedPub{newMock()}
	sp.maxBytes = 4096
	p2 := newTestProducer(t, sp, ProducerConfig{})
	if p2.cfg.MaxBatchBytes != 4096 || p2.maxMsg != 4096 {
		t.Errorf("MaxBatchBytes with a sizer = %d (max message %d), want 4096", p2.cfg.MaxBatchBytes, p2.maxMsg)
	}
	p3 := newTestProducer(t, sp, ProducerConfig{MaxBatchBytes: 1 << 20})
	if p3.maxMsg != 4096 {
		t.Errorf("max message above the publisher's limit = %d, want 4096", p3.maxMsg)
	}
}

func TestProducerErrorDecisions(t *testing.T) {
	a, b := RetryBatch(time.Second), RetryBatch(time.Second)
	if a != b || a == RetryBatch(2*time.Second) {
		t.Error("RetryBatch decisions do not compare by value")
	}
	if FailBatchAndStop == FailBatchAndContinue || (ErrorDecision{}) != FailBatchAndStop {
		t.Error("unexpected decision equality")
	}
	if RetryBatch(-time.Second) != RetryBatch(0) {
		t.Error("negative retry delay not clamped")
	}
	for _, d := range []ErrorDecision{FailBatchAndStop, FailBatchAndContinue, RetryBatch(time.Millisecond)} {
		if d.String() == "" {
			t.Errorf("%#v has no String", d)
		}
	}
}

func TestProducerBatchesKeepSizeAndOrder(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			if err := g.wait(ctx); err != nil {
				return rejected("test-topic", len(b), err)
			}
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b), Delivered: 2}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 7})
	ctx := prodCtx(t, prodWait)
	const n = 1000
	futs := make([]*Produced, n)
	futs[0] = p.Produce(ctx, pm(0))
	mp.waitStarted(t) // batch 0 in flight: the rest queues up
	for i := 1; i < n; i++ {
		futs[i] = p.Produce(ctx, pm(i))
	}
	g.open()
	if err := p.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	for i, f := range futs {
		ack := prodAccepted(t, f)
		if ack.Delivered != 2 || ack.Topic != "test-topic" {
			t.Fatalf("message %d ack = %+v", i, ack)
		}
	}
	batches := mp.recorded()
	for i, b := range batches {
		if len(b) == 0 || len(b) > 7 {
			t.Fatalf("batch %d has %d messages, want 1..7", i, len(b))
		}
	}
	if len(batches) < n/7 {
		t.Fatalf("%d batches for %d messages of batch size 7", len(batches), n)
	}
	all := mp.flat()
	if len(all) != n {
		t.Fatalf("published %d messages, want %d", len(all), n)
	}
	for i, s := range all {
		if s != string(pm(i)) {
			t.Fatalf("message %d published = %s, want %s", i, s, pm(i))
		}
	}
}

func TestProducerMaxBatchBytes(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if call == 0 {
			_ = g.wait(ctx)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
	// 100-byte messages cost 108 bytes each: 4 fit in 450.
	p := newTestProducer(t, mp, ProducerConfig{MaxBatchBytes: 450})
	ctx := prodCtx(t, prodWait)
	data := make([]byte, 100)
	p.Produce(ctx, data)
	mp.waitStarted(t)
	for range 20 {
		p.Produce(ctx, data)
	}
	g.open()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	total := 0
	for i, b := range mp.recorded() {
		total += len(b)
		if len(b) > 4 {
			t.Fatalf("batch %d has %d messages of 100 bytes, MaxBatchBytes 450 allows 4", i, len(b))
		}
	}
	if total != 21 {
		t.Fatalf("published %d messages, want 21", total)
	}
}

func TestProducerTooLarge(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{MaxBatchBytes: 100})
	ctx := prodCtx(t, prodWait)
	ack, err := prodDone(t, p.Produce(ctx, make([]byte, 101)), "oversized")
	prodExpectErr(t, ack, err, ErrTooLarge, ReasonTooLarge)
	prodAccepted(t, p.Produce(ctx, make([]byte, 100)))
	for _, b := range mp.recorded() {
		for _, s := range b {
			if len(s) > 100 {
				t.Fatal("an oversized message was published")
			}
		}
	}
}

func TestProducerProduceAfterClose(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, mp, ProducerConfig{})
	ctx := prodCtx(t, prodWait)
	prodAccepted(t, p.Produce(ctx, pm(1)))
	if err := p.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	ack, err := prodDone(t, p.Produce(ctx, pm(2)), "after Close")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	if err := p.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatalf("Flush after Close: %v", err)
	}
	if got := mp.flat(); len(got) != 1 {
		t.Fatalf("published %v, want only m00001", got)
	}
}

func TestProducerCloseDrainsQueue(t *testing.T) {
	mp := newMock()
	// A long linger: only Close makes these go out.
	p := newTestProducer(t, mp, ProducerConfig{Linger: time.Hour, BatchSize: 10})
	ctx := prodCtx(t, prodWait)
	futs := make([]*Produced, 25)
	for i := range futs {
		futs[i] = p.Produce(ctx, pm(i))
	}
	if err := p.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, f := range futs {
		if _, err := prodDone(t, f, "after Close"); err != nil {
			t.Fatalf("queued message failed on Close: %v", err)
		}
	}
	if got := len(mp.flat()); got != 25 {
		t.Fatalf("published %d, want 25", got)
	}
}

func TestProducerCloseFailsPendingWhenCtxEnds(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		<-ctx.Done() // stuck until cancelled
		return rejected("test-topic", len(b), ctx.Err())
	}
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 5, PublishTimeout: time.Hour})
	ctx := prodCtx(t, prodWait)
	futs := []*Produced{p.Produce(ctx, pm(0))}
	mp.waitStarted(t)
	for i := 1; i < 20; i++ {
		futs = append(futs, p.Produce(ctx, pm(i)))
	}
	cctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.Close(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want context.DeadlineExceeded", err)
	}
	// Message 0's batch was in flight: it may have been delivered, so its
	// outcome is unknown. The others were never sent.
	ack, err := prodDone(t, futs[0], "the in-flight message after Close")
	prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("in-flight message: err %v, want it to wrap ErrClosed too", err)
	}
	for i, f := range futs[1:] {
		ack, err := prodDone(t, f, fmt.Sprintf("message %d after Close", i+1))
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	}
	if n := mp.callCount(); n != 1 {
		t.Fatalf("%d publish calls, want 1", n)
	}
}

func TestProducerQueueFull(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = acceptAfter(g)
	p := newTestProducer(t, mp, ProducerConfig{BatchSize: 1, MaxQueueSize: 5})
	ctx := prodCtx(t, prodWait)
	first := p.Produce(ctx, pm(0))
	mp.waitStarted(t) // in flight: not counted in the queue
	queued := make([]*Produced, 5)
	for i := range queued {
		queued[i] = p.Produce(ctx, pm(i+1))
	}
	ack, err := prodDone(t, p.Produce(ctx, pm(99)), "queue full")
	prodExpectErr(t, ack, err, ErrQueueFull, ReasonQueueFull)
	g.open()
	prodAccepted(t, first)
	for _, f := range queued {
		prodAccepted(t, f)
	}
	if slices.Contains(mp.flat(), string(pm(99))) {
		t.Fatal("rejected message was published")
	}
	// Room again.
	prodAccepted(t, p.Produce(ctx, pm(100)))
}
