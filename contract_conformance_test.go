package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// gatedPublisher is a Publisher (and Initializer) of the kind the contract
// says a BatchingProducer works over: it records each batch's size and
// holds every batch until open is closed.
type gatedPublisher struct {
	open chan struct{}

	mu      sync.Mutex
	sizes   []int
	calls   []string // "init" or "batch", in order
	started chan struct{}
}

func newGatedPublisher() *gatedPublisher {
	return &gatedPublisher{open: make(chan struct{}), started: make(chan struct{}, 1)}
}

func (p *gatedPublisher) Initialize(context.Context, string) error {
	p.mu.Lock()
	p.calls = append(p.calls, "init")
	p.mu.Unlock()
	return nil
}

func (p *gatedPublisher) Publish(ctx context.Context, topic string, data []byte) (pubsub.PublishAck, error) {
	return p.PublishBatch(ctx, topic, [][]byte{data})
}

func (p *gatedPublisher) PublishBatch(ctx context.Context, topic string, batch [][]byte) (pubsub.PublishAck, error) {
	p.mu.Lock()
	p.sizes = append(p.sizes, len(batch))
	p.calls = append(p.calls, "batch")
	p.mu.Unlock()
	select {
	case p.started <- struct{}{}:
	default:
	}
	select {
	case <-p.open:
		return pubsub.PublishAck{Topic: topic, Status: pubsub.Accepted, Messages: len(batch)}, nil
	case <-ctx.Done():
		return pubsub.PublishAck{Topic: topic, Status: pubsub.Rejected, Reason: pubsub.ReasonTimeout, Messages: len(batch)},
			errors.Join(pubsub.ErrTimeout, ctx.Err())
	}
}

func (p *gatedPublisher) record() (sizes []int, calls []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.sizes), slices.Clone(p.calls)
}

// TestContractProducerZeroConfigDefaults checks, through a BatchingProducer
// over a plain Publisher, that a zero ProducerConfig behaves as the
// documented defaults: batches of at most 2000 messages, no linger, a queue
// of 100 000 messages beside the batches in flight, and Initialize called
// before the first batch.
func TestContractProducerZeroConfigDefaults(t *testing.T) {
	ctx := ctxT(t)

	t.Run("Linger 0: a lone message goes without Flush", func(t *testing.T) {
		p := newGatedPublisher()
		close(p.open)
		prod, err := pubsub.NewBatchingProducer(p, "t", pubsub.ProducerConfig{})
		require.NoError(t, err)
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		ack, err := prod.Produce(ctx, []byte("x")).Wait(wctx)
		require.NoError(t, err)
		assert.Equal(t, pubsub.Accepted, ack.Status)
		require.NoError(t, prod.Close(ctx))
		_, calls := p.record()
		assert.Equal(t, []string{"init", "batch"}, calls, "Initialize runs before the first batch")
	})

	t.Run("BatchSize 2000 and MaxQueueSize 100 000", func(t *testing.T) {
		p := newGatedPublisher()
		prod, err := pubsub.NewBatchingProducer(p, "t", pubsub.ProducerConfig{})
		require.NoError(t, err)
		// The first batch is stuck in the publisher: everything after it
		// queues, up to MaxQueueSize beside the batches in flight
		// (MaxInFlight's default is 4, see README).
		first := prod.Produce(ctx, []byte("first"))
		<-p.started
		const inFlightBound = pubsub.DefaultMaxInFlight * pubsub.DefaultBatchSize
		const n = pubsub.DefaultMaxQueueSize + inFlightBound + 1000
		data := []byte("m")
		futures := make([]*pubsub.Produced, 0, n)
		full := 0
		for range n {
			f := prod.Produce(ctx, data)
			if ack, err, done := f.Result(); done {
				require.ErrorIs(t, err, pubsub.ErrQueueFull)
				require.Equal(t, pubsub.ReasonQueueFull, ack.Reason)
				full++
				continue
			}
			futures = append(futures, f)
		}
		waiting := len(futures)
		assert.GreaterOrEqual(t, waiting, pubsub.DefaultMaxQueueSize, "the default queue holds 100 000 messages")
		assert.LessOrEqual(t, waiting, pubsub.DefaultMaxQueueSize+inFlightBound, "at most MaxQueueSize wait beside the batches in flight")
		assert.Equal(t, n, waiting+full)
		close(p.open)
		require.NoError(t, prod.Flush(ctx))
		_, err = first.Wait(ctx)
		require.NoError(t, err)
		for _, f := range futures[len(futures)-10:] {
			_, err := f.Wait(ctx)
			require.NoError(t, err)
		}
		require.NoError(t, prod.Close(ctx))
		sizes, _ := p.record()
		assert.Equal(t, pubsub.DefaultBatchSize, slices.Max(sizes), "batches of at most BatchSize (2000), full ones when queued")
	})
}

// TestContractZeroOptionsMeanDefaults checks that a zero option value means
// the documented default: WithPrefix("") uses the "pubsub" prefix (and
// nothing goes outside "pubsub.>" but NATS reply inboxes), WithEvictAfter(0)
// evicts on the third failure in a row, WithMaxMembers(0) is no cap of 0.
func TestContractZeroOptionsMeanDefaults(t *testing.T) {
	c := testcluster.New(t, 1, 0)
	ctx := ctxT(t)
	spy := c.Connect(t, 0)
	var mu sync.Mutex
	subjects := map[string]bool{}
	_, err := spy.Subscribe(">", func(m *nats.Msg) {
		mu.Lock()
		subjects[m.Subject] = true
		mu.Unlock()
	})
	require.NoError(t, err)
	require.NoError(t, spy.Flush())

	opts := append(append([]pubsub.Option{}, fast...), pubsub.WithPrefix(""), pubsub.WithEvictAfter(0),
		pubsub.WithMaxMembers(0), pubsub.WithNodeID("zero-opts"))
	n, err := pubsub.Join(ctx, c.Connect(t, 0), opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = n.Close(context.Background()) })
	require.Equal(t, []string{"zero-opts"}, memberIDs(n.Members()))

	var calls int
	var callsMu sync.Mutex
	sub, err := n.Subscribe(ctx, "zero-t", func(context.Context, *pubsub.Message) error {
		callsMu.Lock()
		calls++
		callsMu.Unlock()
		return errors.New("fails")
	})
	require.NoError(t, err)
	for i := range 2 {
		ack, err := n.Publish(ctx, "zero-t", []byte("x"))
		require.NoError(t, err)
		require.Len(t, ack.Failures, 1, "publish %d", i)
		assert.Equal(t, pubsub.HandlerError, ack.Failures[0].Status)
	}
	select {
	case <-sub.Done():
		t.Fatalf("evicted after 2 failures: %v (EvictAfter(0) must mean 3)", sub.Err())
	default:
	}
	_, err = n.Publish(ctx, "zero-t", []byte("x"))
	require.NoError(t, err)
	select {
	case <-sub.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("not evicted after 3 failures in a row")
	}
	assert.ErrorIs(t, sub.Err(), pubsub.ErrEvicted)

	testcluster.WaitFor(t, 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return subjects["pubsub.members"] && subjects["pubsub.node.zero-opts"]
	}, "no heartbeat on pubsub.members nor message to pubsub.node.zero-opts: %v", subjects)
	require.NoError(t, n.Close(ctx))
	mu.Lock()
	defer mu.Unlock()
	for s := range subjects {
		assert.True(t, strings.HasPrefix(s, "pubsub.") || strings.HasPrefix(s, nats.InboxPrefix), "published on %q", s)
	}
}

func memberIDs(ms []pubsub.Member) []string {
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.ID
	}
	return ids
}

// scriptedPublisher answers every batch with fn.
type scriptedPublisher struct {
	fn func(ctx context.Context, call int, batch [][]byte) (pubsub.PublishAck, error)
	mu sync.Mutex
	n  int
}

func (p *scriptedPublisher) Publish(ctx context.Context, topic string, data []byte) (pubsub.PublishAck, error) {
	return p.PublishBatch(ctx, topic, [][]byte{data})
}

func (p *scriptedPublisher) PublishBatch(ctx context.Context, _ string, batch [][]byte) (pubsub.PublishAck, error) {
	p.mu.Lock()
	call := p.n
	p.n++
	p.mu.Unlock()
	return p.fn(ctx, call, batch)
}

// TestContractProducedErrorsComeWithRejectedAcks checks "for a Produced, as
// for Publish: a non-nil error comes with a Rejected ack" and
// errors.Is(err, ack.Reason.Err()) on every way a producer can fail a
// future: a publisher error that wraps no sentinel (with a zero ack), a
// rejected ack, the default FailBatchAndStop stopping the producer, and a
// Close whose ctx ends with work queued.
func TestContractProducedErrorsComeWithRejectedAcks(t *testing.T) {
	ctx := ctxT(t)
	check := func(t *testing.T, f *pubsub.Produced, what string) (pubsub.PublishAck, error) {
		t.Helper()
		ack, err := f.Wait(ctx)
		if err == nil {
			assert.Equal(t, pubsub.Accepted, ack.Status, "%s: nil error with ack %+v", what, ack)
			return ack, err
		}
		assert.Equal(t, pubsub.Rejected, ack.Status, "%s: error %v with ack %+v", what, err, ack)
		assert.NotEqual(t, pubsub.ReasonNone, ack.Reason, "%s: error %v with ack %+v", what, err, ack)
		assert.ErrorIs(t, err, ack.Reason.Err(), "%s: ack %+v", what, ack)
		return ack, err
	}
	boom := errors.New("boom")
	for _, tt := range []struct {
		name string
		fn   func(ctx context.Context, call int, batch [][]byte) (pubsub.PublishAck, error)
	}{
		{"a plain error with a zero ack", func(context.Context, int, [][]byte) (pubsub.PublishAck, error) {
			return pubsub.PublishAck{}, boom
		}},
		{"a rejected ack", func(_ context.Context, _ int, b [][]byte) (pubsub.PublishAck, error) {
			return pubsub.PublishAck{Topic: "t", Status: pubsub.Rejected, Reason: pubsub.ReasonTopicUnavailable, Messages: len(b)},
				pubsub.ErrTopicUnavailable
		}},
		{"ErrClosed", func(_ context.Context, _ int, b [][]byte) (pubsub.PublishAck, error) {
			return pubsub.PublishAck{Topic: "t", Status: pubsub.Rejected, Reason: pubsub.ReasonClosed, Messages: len(b)}, pubsub.ErrClosed
		}},
	} {
		for _, decide := range []func(int, error) pubsub.ErrorDecision{nil,
			func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue }} {
			name := tt.name + ", FailBatchAndStop"
			if decide != nil {
				name = tt.name + ", FailBatchAndContinue"
			}
			t.Run(name, func(t *testing.T) {
				p := &scriptedPublisher{fn: tt.fn}
				prod, err := pubsub.NewBatchingProducer(p, "t", pubsub.ProducerConfig{OnPublishError: decide, BatchSize: 2})
				require.NoError(t, err)
				var fs []*pubsub.Produced
				for range 7 {
					fs = append(fs, prod.Produce(ctx, []byte("x")))
				}
				for i, f := range fs {
					_, err := check(t, f, fmt.Sprintf("future %d", i))
					assert.Error(t, err)
				}
				_, err = check(t, prod.Produce(ctx, []byte("late")), "after the failure")
				assert.Error(t, err)
				_ = prod.Flush(ctx)
				_ = prod.Close(ctx)
				_, err = check(t, prod.Produce(ctx, []byte("closed")), "after Close")
				assert.ErrorIs(t, err, pubsub.ErrClosed)
			})
		}
	}

	t.Run("Close whose ctx ends with work queued", func(t *testing.T) {
		g := newGatedPublisher()
		prod, err := pubsub.NewBatchingProducer(g, "t", pubsub.ProducerConfig{BatchSize: 1, MaxInFlight: 1})
		require.NoError(t, err)
		var fs []*pubsub.Produced
		for range 5 {
			fs = append(fs, prod.Produce(ctx, []byte("x")))
		}
		<-g.started
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		err = prod.Close(short)
		assert.Error(t, err)
		close(g.open)
		rejected := 0
		for i, f := range fs {
			if _, err := check(t, f, fmt.Sprintf("future %d", i)); err != nil {
				rejected++
			}
		}
		assert.Positive(t, rejected, "Close cancels the rest")
	})
}

// TestContractExpiredDeadline checks the error contract for a call whose
// ctx deadline has already passed (as opposed to a cancelled ctx, which
// TestContractErrors checks): the ack is Rejected, errors.Is(err,
// ack.Reason.Err()) holds, the ctx error is found too, and a failed
// Subscribe returns a nil *Subscription.
func TestContractExpiredDeadline(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	expired, cancel := context.WithDeadline(ctxT(t), time.Now().Add(-time.Second))
	defer cancel()
	for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
		ack, err := n.PublishMessages(expired, "t", []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(level))
		require.Error(t, err, level)
		assert.Equal(t, pubsub.Rejected, ack.Status, level)
		assert.ErrorIs(t, err, ack.Reason.Err(), "%s: ack %+v", level, ack)
		assert.ErrorIs(t, err, context.DeadlineExceeded, level)
	}
	sub, err := n.Subscribe(expired, "t", noop)
	assert.Nil(t, sub)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorIs(t, n.Initialize(expired, "t"), context.DeadlineExceeded)
	p, err := pubsub.NewBatchingProducer(n, "t", pubsub.ProducerConfig{})
	require.NoError(t, err)
	ack, err := p.Produce(expired, []byte("x")).Wait(ctxT(t))
	require.Error(t, err)
	assert.Equal(t, pubsub.Rejected, ack.Status)
	assert.ErrorIs(t, err, ack.Reason.Err(), "ack %+v", ack)
	require.NoError(t, p.Close(ctxT(t)))
}

// TestContractClientOnlyClusterInitialize checks that Initialize, the
// fail-fast warm-up, says ErrTopicUnavailable in a cluster of only client
// nodes, as OwnerOf and Publish do, and that a producer over such a node
// fails its futures with ReasonTopicUnavailable.
func TestContractClientOnlyClusterInitialize(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithClientOnly(), pubsub.WithRequestTimeout(300*time.Millisecond))
	n := c.Nodes[0]
	ctx := ctxT(t)
	assert.ErrorIs(t, n.Initialize(ctx, "t"), pubsub.ErrTopicUnavailable)
	p, err := pubsub.NewBatchingProducer(n, "t", pubsub.ProducerConfig{})
	require.NoError(t, err)
	ack, err := p.Produce(ctx, []byte("x")).Wait(ctx)
	require.ErrorIs(t, err, pubsub.ErrTopicUnavailable)
	assert.Equal(t, pubsub.Rejected, ack.Status)
	assert.Equal(t, pubsub.ReasonTopicUnavailable, ack.Reason)
	_ = p.Close(ctx)
	topics, err := n.Topics(ctx)
	require.NoError(t, err)
	assert.Empty(t, topics)
}

// TestContractEveryRemovalIsAnEvent checks "every removal is an event" for
// the removals the node itself does not ask for: a subscriber's node leaving
// (Close) and crashing (silent past MemberTimeout). The owner emits
// SubscriberRemoved for each of that node's subscribers, with its Group.
func TestContractEveryRemovalIsAnEvent(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 3)
	ctx := ctxT(t)
	owner := c.Nodes[0]
	topic := ownedBy(t, owner, "removal")
	log := watch(t, owner)
	leaving := subscribe(t, c.Nodes[1], topic, noop)
	leavingMember, err := c.Nodes[1].Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
	require.NoError(t, err)
	crashing, err := c.Nodes[2].Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
	require.NoError(t, err)

	c.CloseNode(t, 1)
	for _, s := range []*pubsub.Subscription{leaving, leavingMember} {
		rm := find(t, log, func(e pubsub.SubscriberRemoved) bool { return e.Subscriber == s.ID() })
		assert.Equal(t, topic, rm.Topic)
		assert.Equal(t, s.Group(), rm.Group)
		assert.Equal(t, owner.ID(), rm.Node)
	}
	c.Crash(2)
	rm := find(t, log, func(e pubsub.SubscriberRemoved) bool { return e.Subscriber == crashing.ID() })
	assert.Equal(t, "g", rm.Group)
	ack, err := owner.Publish(ctx, topic, []byte("x"))
	require.NoError(t, err)
	assert.Zero(t, ack.Delivered)
}

// TestContractRejectedAckNamesItsBatch checks that a rejected ack still
// describes the batch it answers: its Topic and Messages ("messages in the
// batch"), whatever the Reason.
func TestContractRejectedAckNamesItsBatch(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	ctx := ctxT(t)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	three := [][]byte{[]byte("a"), []byte("b"), []byte("c")}
	big := make([]byte, n.MaxMessageSize()+1)
	for _, tt := range []struct {
		name  string
		topic string
		call  func(topic string) (pubsub.PublishAck, error)
	}{
		{"invalid topic", "a b", func(topic string) (pubsub.PublishAck, error) { return n.PublishBatch(ctx, topic, three) }},
		{"cancelled", "t", func(topic string) (pubsub.PublishAck, error) { return n.PublishBatch(cancelled, topic, three) }},
		{"too large", "t", func(topic string) (pubsub.PublishAck, error) {
			return n.PublishBatch(ctx, topic, [][]byte{[]byte("a"), big, []byte("c")})
		}},
		{"invalid header", "t", func(topic string) (pubsub.PublishAck, error) {
			return n.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("a")}, {Data: []byte("b")}, {Header: pubsub.Header{"a b": nil}}})
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ack, err := tt.call(tt.topic)
			require.Error(t, err)
			assert.Equal(t, pubsub.Rejected, ack.Status)
			assert.Equal(t, tt.topic, ack.Topic)
			assert.Equal(t, 3, ack.Messages)
		})
	}
}
