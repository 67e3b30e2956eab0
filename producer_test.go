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

// White-box unit tests of BatchingProducer against a scripted Publisher.
// They synchronise on channels and conditions with deadlines, never on
// sleeps; the few "must not happen" checks wait a short while, which can
// only make them pass by mistake, never fail by mistake.

// prodWait bounds every wait for something that must happen.
const prodWait = 10 * time.Second

// mockPub is a Publisher whose behaviour each test scripts with fn. It
// records every batch (as strings) and when each call started, and counts
// the calls running at once.
type mockPub struct {
	mu       sync.Mutex
	batches  [][]string
	callAt   []time.Time
	running  int
	peak     int
	calls    int
	started  chan int // call index, sent (if not nil) when a call starts
	fn       func(ctx context.Context, call int, batch [][]byte) (PublishAck, error)
	maxBytes int           // MaxMessageSize, when the mock is wrapped as a sizer
	origins  []batchOrigin // recorded by orderedPub, one per call
}

func newMock() *mockPub { return &mockPub{started: make(chan int, 1000)} }

func (m *mockPub) Publish(ctx context.Context, topic string, data []byte) (PublishAck, error) {
	return m.PublishBatch(ctx, topic, [][]byte{data})
}

func (m *mockPub) PublishBatch(ctx context.Context, topic string, batch [][]byte) (PublishAck, error) {
	return m.do(ctx, topic, batch, nil)
}

// do records the call, reports it issued (when issued is not nil) and
// behaves as scripted.
func (m *mockPub) do(ctx context.Context, topic string, batch [][]byte, issued func()) (PublishAck, error) {
	m.mu.Lock()
	call := m.calls
	m.calls++
	rec := make([]string, len(batch))
	for i, b := range batch {
		rec[i] = string(b)
	}
	m.batches = append(m.batches, rec)
	m.callAt = append(m.callAt, time.Now())
	m.running++
	m.peak = max(m.peak, m.running)
	fn := m.fn
	m.mu.Unlock()
	if issued != nil {
		issued()
	}
	if m.started != nil {
		m.started <- call
	}
	defer func() {
		m.mu.Lock()
		m.running--
		m.mu.Unlock()
	}()
	if fn != nil {
		return fn(ctx, call, batch)
	}
	return PublishAck{Topic: topic, Status: Accepted, Messages: len(batch), Delivered: 1}, nil
}

func (m *mockPub) recorded() [][]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.batches)
}

func (m *mockPub) callCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.calls
}

func (m *mockPub) peakRunning() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peak
}

// flat returns every recorded message in publish order.
func (m *mockPub) flat() []string {
	var all []string
	for _, b := range m.recorded() {
		all = append(all, b...)
	}
	return all
}

// waitStarted waits for the next call to start and returns its index.
func (m *mockPub) waitStarted(t *testing.T) int {
	t.Helper()
	select {
	case c := <-m.started:
		return c
	case <-time.After(prodWait):
		t.Fatal("no publish call started")
		return -1
	}
}

// sizedPub is a mockPub with a MaxMessageSize method.
type sizedPub struct{ *mockPub }

func (s sizedPub) MaxMessageSize() int { return s.maxBytes }

// initPub is a mockPub that also implements Initializer.
type initPub struct {
	*mockPub
	initFn func(call int) error
	imu    sync.Mutex
	inits  int
	log    []string // "init" and "batch" in call order
}

func (p *initPub) Initialize(ctx context.Context, topic string) error {
	p.imu.Lock()
	call := p.inits
	p.inits++
	p.log = append(p.log, "init")
	p.imu.Unlock()
	if p.initFn != nil {
		return p.initFn(call)
	}
	return nil
}

func (p *initPub) PublishBatch(ctx context.Context, topic string, batch [][]byte) (PublishAck, error) {
	p.imu.Lock()
	p.log = append(p.log, "batch")
	p.imu.Unlock()
	return p.mockPub.PublishBatch(ctx, topic, batch)
}

// orderedPub is a mockPub implementing orderedPublisher: it reports a
// batch issued once it has recorded it.
type orderedPub struct{ *mockPub }

func (o orderedPub) publishBatchIssued(ctx context.Context, topic string, batch [][]byte, issued func(), producer string, seq uint64) (PublishAck, error) {
	o.mu.Lock()
	o.origins = append(o.origins, batchOrigin{producer: producer, seq: seq})
	o.mu.Unlock()
	return o.do(ctx, topic, batch, issued)
}

func newTestProducer(t *testing.T, p Publisher, cfg ProducerConfig) *BatchingProducer {
	t.Helper()
	bp, err := NewBatchingProducer(p, "test-topic", cfg)
	if err != nil {
		t.Fatalf("NewBatchingProducer: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = bp.Close(ctx)
	})
	return bp
}

func prodCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func pm(i int) []byte { return []byte(fmt.Sprintf("m%05d", i)) }

// prodResult waits for f and returns its outcome.
func prodResult(t *testing.T, f *Produced) (PublishAck, error) {
	t.Helper()
	select {
	case <-f.Done():
	case <-time.After(prodWait):
		t.Fatal("future not done")
	}
	ack, err, ok := f.Result()
	if !ok {
		t.Fatal("Done closed but Result not ok")
	}
	return ack, err
}

func prodDone(t *testing.T, f *Produced, what string) (PublishAck, error) {
	t.Helper()
	select {
	case <-f.Done():
	default:
		t.Fatalf("%s: future not done on return", what)
	}
	ack, err, _ := f.Result()
	return ack, err
}

func prodExpectErr(t *testing.T, ack PublishAck, err error, sentinel error, reason Reason) {
	t.Helper()
	if !errors.Is(err, sentinel) {
		t.Fatalf("err = %v, want %v", err, sentinel)
	}
	if ack.Status != Rejected || ack.Reason != reason {
		t.Fatalf("ack = %+v, want Rejected/%s", ack, reason)
	}
	if !errors.Is(err, ack.Reason.Err()) {
		t.Fatalf("errors.Is(%v, %v) is false", err, ack.Reason.Err())
	}
}

func prodAccepted(t *testing.T, f *Produced) PublishAck {
	t.Helper()
	ack, err := prodResult(t, f)
	if err != nil || ack.Status != Accepted {
		t.Fatalf("outcome = %+v, %v; want Accepted", ack, err)
	}
	return ack
}

// testGate blocks publish calls until released.
type testGate struct {
	once sync.Once
	ch   chan struct{}
}

func newTestGate() *testGate { return &testGate{ch: make(chan struct{})} }
func (g *testGate) open()    { g.once.Do(func() { close(g.ch) }) }
func (g *testGate) wait(ctx context.Context) error {
	select {
	case <-g.ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitPub is a mockPub that reports its own wait per attempt, as *Node does.
type waitPub struct {
	*mockPub
	wait time.Duration
}

func (w waitPub) publishWait() time.Duration { return w.wait }

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
		c.PublishTimeout != DefaultPublishTimeout || c.MaxInFlight != 1 {
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
	for i, f := range futs {
		ack, err := prodDone(t, f, fmt.Sprintf("message %d after Close", i))
		prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	}
	if n := mp.callCount(); n != 1 {
		t.Fatalf("%d publish calls, want 1", n)
	}
}

func TestProducerQueueFull(t *testing.T) {
	mp := newMock()
	g := newTestGate()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if err := g.wait(ctx); err != nil {
			return rejected("test-topic", len(b), err)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
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

func TestProducerRetryLeavesOutCancelled(t *testing.T) {
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
	ack, err := prodResult(t, fb)
	prodExpectErr(t, ack, err, context.Canceled, ReasonCancelled)
	prodAccepted(t, fc)
	got := mp.recorded()
	want := [][]string{{"first"}, {"a", "b", "c"}, {"a", "c"}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("batches %v, want %v", got, want)
	}
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
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if err := g.wait(ctx); err != nil {
			return rejected("test-topic", len(b), err)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
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
	p := newTestProducer(t, orderedPub{mp}, ProducerConfig{BatchSize: 1,
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
