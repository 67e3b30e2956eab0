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

// Test doubles and helpers for the BatchingProducer unit tests: mock
// Publishers that record batches, gate them, or fail on demand.

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

func (o orderedPub) publishBatchIssued(ctx context.Context, topic string, batch msgBatch, opts issueOpts) (PublishAck, error) {
	o.mu.Lock()
	o.origins = append(o.origins, batchOrigin{producer: opts.producer, seq: opts.seq})
	o.mu.Unlock()
	return o.do(ctx, topic, batch.data, opts.issued)
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

// acceptAfter is a mockPub script: each call waits for g to open, then
// accepts its batch (or fails with ctx's error if ctx ends first).
func acceptAfter(g *testGate) func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
	return func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if err := g.wait(ctx); err != nil {
			return rejected("test-topic", len(b), err)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b)}, nil
	}
}

func (g *testGate) open() { g.once.Do(func() { close(g.ch) }) }

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
