package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// hookRecorder implements both hook interfaces and keeps what it saw.
type hookRecorder struct {
	mu        sync.Mutex
	published []pubsub.PublishInfo
	handled   []pubsub.HandledInfo
}

func (r *hookRecorder) OnPublish(i pubsub.PublishInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.published = append(r.published, i)
}

func (r *hookRecorder) OnHandled(i pubsub.HandledInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handled = append(r.handled, i)
}

func (r *hookRecorder) publishes() []pubsub.PublishInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]pubsub.PublishInfo(nil), r.published...)
}

func (r *hookRecorder) handles() []pubsub.HandledInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]pubsub.HandledInfo(nil), r.handled...)
}

// waitHandled waits until r saw n handled batches and returns them.
func (r *hookRecorder) waitHandled(t *testing.T, n int) []pubsub.HandledInfo {
	t.Helper()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(r.handles()) >= n }, "handled hooks: %d, want %d", len(r.handles()), n)
	return r.handles()
}

// hookedCluster is 3 nodes on 3 servers, each with its own recorder.
func hookedCluster(t *testing.T, opts ...pubsub.Option) (*testcluster.Cluster, []*hookRecorder) {
	c := newCluster(t, 3, 0)
	recs := make([]*hookRecorder, 3)
	for i := range recs {
		recs[i] = &hookRecorder{}
		c.AddNode(t, "n"+string(rune('0'+i)), i, append(append(append([]pubsub.Option{}, fast...), opts...), pubsub.WithHooks(recs[i]))...)
	}
	c.WaitConverged(t, 10*time.Second)
	return c, recs
}

func TestHooksSeePublishesAndHandledBatchesAcrossNodes(t *testing.T) {
	c, recs := hookedCluster(t)
	topic := ownedBy(t, c.Nodes[1], "hooked")
	for _, i := range []int{1, 2} {
		subscribe(t, c.Nodes[i], topic, func(context.Context, *pubsub.Message) error {
			time.Sleep(5 * time.Millisecond) // a handler's time, for Duration
			return nil
		})
	}
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{
		{Data: []byte("abc")}, {Data: []byte("de"), Key: "k"}, {Data: []byte("f"), Header: pubsub.Header{"h": {"vv"}}},
	})
	mustAccept(t, ack, err, 2)

	pubs := recs[0].publishes()
	require.Len(t, pubs, 1, "one OnPublish per call, on the publishing node")
	p := pubs[0]
	assert.Equal(t, topic, p.Topic)
	assert.Equal(t, 3, p.Messages)
	assert.GreaterOrEqual(t, p.Bytes, 3+2+1+1+1+2, "data, key and header count")
	assert.NoError(t, p.Err)
	assert.Equal(t, 2, p.Ack.Delivered)
	assert.Greater(t, p.Duration, 5*time.Millisecond, "the call waited for the handlers")
	assert.Empty(t, recs[1].publishes(), "the owner publishes nothing of its own")

	for _, i := range []int{1, 2} {
		h := recs[i].waitHandled(t, 1)
		require.Len(t, h, 1)
		assert.Equal(t, topic, h[0].Topic)
		assert.Equal(t, c.Nodes[i].ID(), h[0].Subscriber.Node)
		assert.Equal(t, 3, h[0].Messages)
		assert.Equal(t, pubsub.Delivered, h[0].Status)
		assert.NoError(t, h[0].Err)
		assert.GreaterOrEqual(t, h[0].Duration, 15*time.Millisecond, "three messages of 5 ms")
		assert.Empty(t, h[0].Group)
	}
	assert.Empty(t, recs[0].handles(), "no subscriber on n0")
}

// The outcomes a subscriber's node can see, each reported once.
func TestHandledHookReportsEachOutcome(t *testing.T) {
	c, recs := hookedCluster(t, pubsub.WithSubscriberTimeout(300*time.Millisecond), pubsub.WithEvictAfter(100))
	t.Run("handler error", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "fails")
		failure := errors.New("no")
		subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { return failure })
		before := len(recs[2].handles())
		_, _ = c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
		h := recs[2].waitHandled(t, before+1)[before]
		assert.Equal(t, pubsub.HandlerError, h.Status)
		assert.ErrorIs(t, h.Err, failure, "the hook is told what the handler returned")
	})
	t.Run("handler panic", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "panics")
		subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { panic("bad message") })
		before := len(recs[2].handles())
		_, _ = c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
		h := recs[2].waitHandled(t, before+1)[before]
		assert.Equal(t, pubsub.HandlerError, h.Status)
		require.Error(t, h.Err)
		assert.Contains(t, h.Err.Error(), "handler panicked: bad message")
		var pe *pubsub.PanicError
		require.ErrorAs(t, h.Err, &pe, "the hook gets the panic's value and stack")
		assert.Equal(t, "bad message", pe.Value)
		assert.Contains(t, string(pe.Stack), "TestHandledHookReportsEachOutcome", "the stack reaches the panicking handler")
	})
	t.Run("handler panic with an error", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "panics-err")
		bug := errors.New("nil map")
		subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { panic(bug) })
		before := len(recs[2].handles())
		_, _ = c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
		h := recs[2].waitHandled(t, before+1)[before]
		assert.Equal(t, pubsub.HandlerError, h.Status)
		assert.ErrorIs(t, h.Err, bug, "a panic with an error unwraps to it")
		var pe *pubsub.PanicError
		require.ErrorAs(t, h.Err, &pe)
		assert.Equal(t, bug, pe.Value)
	})
	t.Run("timeout, then mailbox wait", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "slow")
		release := make(chan struct{})
		subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error {
			<-release
			return nil
		})
		before := len(recs[2].handles())
		first := make(chan struct{})
		go func() {
			defer close(first)
			_, _ = c.Nodes[0].Publish(context.Background(), topic, []byte("blocks"))
		}()
		// The second batch waits in the mailbox behind the blocked first.
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("waits"))
		require.NoError(t, err)
		require.Len(t, ack.Failures, 1)
		assert.Equal(t, pubsub.Timeout, ack.Failures[0].Status)
		<-first
		close(release)
		h := recs[2].waitHandled(t, before+2)[before:]
		assert.Equal(t, pubsub.Timeout, h[0].Status, "the handler that ran past SubscriberTimeout")
		assert.GreaterOrEqual(t, h[0].Duration, 300*time.Millisecond)
		assert.Equal(t, pubsub.Timeout, h[1].Status, "the batch that timed out in the mailbox")
		assert.GreaterOrEqual(t, h[1].Wait, 300*time.Millisecond)
		assert.Zero(t, h[1].Duration, "its handler never ran it")
	})
	t.Run("mailbox full", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "full")
		release, running := make(chan struct{}), make(chan struct{}, 1)
		_, err := c.Nodes[2].Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error {
			select {
			case running <- struct{}{}:
			default:
			}
			<-release
			return nil
		}, pubsub.WithSubscriptionMailbox(1))
		require.NoError(t, err)
		before := len(recs[2].handles())
		var wg sync.WaitGroup
		defer wg.Wait()
		defer close(release)
		wg.Go(func() { _, _ = c.Nodes[0].Publish(context.Background(), topic, []byte("runs")) })
		<-running
		wg.Go(func() { _, _ = c.Nodes[0].Publish(context.Background(), topic, []byte("queued")) })
		testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Nodes[2].Stats().MaxMailboxDepth == 1 }, "the second batch never queued")
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("refused"))
		require.NoError(t, err)
		require.Len(t, ack.Failures, 1)
		require.Equal(t, pubsub.MailboxFull, ack.Failures[0].Status)
		h := recs[2].waitHandled(t, before+1)[before]
		assert.Equal(t, pubsub.MailboxFull, h.Status)
		assert.Equal(t, 1, h.Messages)
		assert.Zero(t, h.Duration)
	})
}

// Calls rejected before they leave the node reach the hook with their
// error; a producer's batches reach it once each.
func TestPublishHookSeesRejectionsAndProducerBatches(t *testing.T) {
	c, recs := hookedCluster(t)
	_, err := c.Nodes[0].Publish(ctxT(t), "bad topic", []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrInvalidTopic)
	_, err = c.Nodes[0].PublishMessages(ctxT(t), "t", []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"bad name": {"v"}}}})
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	pubs := recs[0].publishes()
	require.Len(t, pubs, 2)
	assert.ErrorIs(t, pubs[0].Err, pubsub.ErrInvalidTopic)
	assert.Equal(t, pubsub.Rejected, pubs[0].Ack.Status)
	assert.ErrorIs(t, pubs[1].Err, pubsub.ErrInvalidMessage)
	assert.Equal(t, 1, pubs[1].Messages)

	topic := ownedBy(t, c.Nodes[1], "produced")
	rec := newRecorder()
	subscribe(t, c.Nodes[2], topic, rec.handler)
	p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{BatchSize: 10})
	require.NoError(t, err)
	defer p.Close(context.Background())
	var last *pubsub.Produced
	for i := range 30 {
		last = p.Produce(ctxT(t), msg(i))
	}
	_, err = last.Wait(ctxT(t))
	require.NoError(t, err)
	messages := 0
	for _, pi := range recs[0].publishes()[2:] {
		assert.Equal(t, topic, pi.Topic)
		assert.NoError(t, pi.Err)
		messages += pi.Messages
	}
	assert.Equal(t, 30, messages, "every produced message in exactly one hooked batch")
}

// panicHook panics in both hooks.
type panicHook struct{}

func (panicHook) OnPublish(pubsub.PublishInfo) { panic("publish hook") }
func (panicHook) OnHandled(pubsub.HandledInfo) { panic("handled hook") }

func TestPanickingHookDoesNotStopTheWork(t *testing.T) {
	c := newCluster(t, 1, 0)
	n := c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(panicHook{}))...)
	rec := newRecorder()
	subscribe(t, n, "t", rec.handler)
	for i := range 2 {
		ack, err := n.Publish(ctxT(t), "t", msg(i))
		mustAccept(t, ack, err, 1)
	}
	assert.Equal(t, 2, rec.total())
}

func TestHookImplementingNothingIsRejected(t *testing.T) {
	c := newCluster(t, 1, 0)
	_, err := pubsub.Join(ctxT(t), c.Connect(t, 0), pubsub.WithHooks(&hookRecorder{}, "not a hook"))
	require.ErrorIs(t, err, pubsub.ErrInvalidConfig)
	assert.Contains(t, err.Error(), "Hooks[1]")
	assert.Contains(t, err.Error(), "PublishHook or HandledHook")
}

// A group member's hook reports its share of each batch, with the group.
func TestHandledHookReportsAGroupMembersShare(t *testing.T) {
	c, recs := hookedCluster(t)
	topic := ownedBy(t, c.Nodes[0], "grouped")
	for _, i := range []int{1, 2} {
		_, err := c.Nodes[i].Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error { return nil }, pubsub.WithGroup("workers"))
		require.NoError(t, err)
	}
	batch := make([][]byte, 10)
	for i := range batch {
		batch[i] = msg(i)
	}
	ack, err := c.Nodes[0].PublishBatch(ctxT(t), topic, batch)
	mustAccept(t, ack, err, 1)
	shares := func() (total int, all []pubsub.HandledInfo) {
		for _, i := range []int{1, 2} {
			for _, h := range recs[i].handles() {
				total += h.Messages
				all = append(all, h)
			}
		}
		return total, all
	}
	// The hooks run once the outcome was reported: maybe after the ack.
	testcluster.WaitFor(t, 5*time.Second, func() bool { total, _ := shares(); return total >= 10 }, "the shares never added up")
	total, all := shares()
	assert.Equal(t, 10, total, "the members' shares add up to the batch")
	for _, h := range all {
		assert.Equal(t, "workers", h.Group)
		assert.Equal(t, pubsub.Delivered, h.Status)
	}
}

// slowHandledHook takes its time in OnHandled.
type slowHandledHook struct {
	hookRecorder
	delay time.Duration
}

func (h *slowHandledHook) OnHandled(i pubsub.HandledInfo) {
	h.hookRecorder.OnHandled(i)
	time.Sleep(h.delay) // a slow hook is the point
}

// Found in review: the hook ran before the outcome was reported, so its own
// time counted against SubscriberTimeout and a batch its handler finished
// at once was reported Timeout.
func TestSlowHandledHookDoesNotTurnADeliveryIntoATimeout(t *testing.T) {
	c := newCluster(t, 1, 0)
	hook := &slowHandledHook{delay: 600 * time.Millisecond}
	n := c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...),
		pubsub.WithSubscriberTimeout(300*time.Millisecond), pubsub.WithEvictAfter(100), pubsub.WithHooks(hook))...)
	subscribe(t, n, "t", func(context.Context, *pubsub.Message) error { return nil })
	ack, err := n.Publish(ctxT(t), "t", []byte("x"))
	mustAccept(t, ack, err, 1)
	h := hook.waitHandled(t, 1)
	assert.Equal(t, pubsub.Delivered, h[0].Status)
}

// Found in review: a handler failing after SubscriberTimeout was reported
// HandlerError to the hook, Timeout to the owner.
func TestHandledHookReportsWhatTheOwnerWasTold(t *testing.T) {
	c, recs := hookedCluster(t, pubsub.WithSubscriberTimeout(200*time.Millisecond), pubsub.WithEvictAfter(100))
	topic := ownedBy(t, c.Nodes[1], "late-fail")
	release := make(chan struct{})
	subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error {
		<-release
		return errors.New("failed after the deadline")
	})
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
	require.NoError(t, err)
	require.Len(t, ack.Failures, 1)
	require.Equal(t, pubsub.Timeout, ack.Failures[0].Status, "the owner was told Timeout")
	close(release)
	h := recs[2].waitHandled(t, 1)
	assert.Equal(t, pubsub.Timeout, h[0].Status)
}

// Found in review: rejections outside the node's publish path (a typed
// topic's codec, a producer's Initialize) were not hooked.
func TestHooksSeeTypedRejectionsAndFailedInitializes(t *testing.T) {
	c, recs := hookedCluster(t)
	t.Run("typed encode", func(t *testing.T) {
		before := len(recs[0].publishes())
		topic, err := pubsub.NewTopic(c.Nodes[0], "typed", pubsub.JSONCodec[any]())
		require.NoError(t, err)
		_, err = topic.Publish(ctxT(t), func() {}) // JSON cannot encode a func
		require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
		pubs := recs[0].publishes()[before:]
		require.Len(t, pubs, 1)
		assert.ErrorIs(t, pubs[0].Err, pubsub.ErrInvalidMessage)
		assert.Equal(t, "typed", pubs[0].Topic)
	})
	t.Run("producer initialize", func(t *testing.T) {
		n := c.AddNode(t, "initializing", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(recs[0]))...)
		c.WaitConverged(t, 10*time.Second)
		// A remote owner, and no time to reach it: the producer's
		// Initialize fails before anything is published. (A producer on a
		// closed node no longer tries: it stops with its node.)
		topic := ownedBy(t, c.Nodes[1], "initialize-fails")
		p, err := pubsub.NewBatchingProducer(n, topic, pubsub.ProducerConfig{PublishTimeout: time.Nanosecond})
		require.NoError(t, err)
		defer p.Close(context.Background())
		before, rejectedBefore := len(recs[0].publishes()), n.Stats().Rejected
		_, err = p.Produce(ctxT(t), []byte("x")).Wait(ctxT(t))
		require.ErrorContains(t, err, "initialize")
		pubs := recs[0].publishes()[before:]
		require.NotEmpty(t, pubs)
		assert.ErrorContains(t, pubs[0].Err, "initialize")
		assert.Equal(t, 1, pubs[0].Messages)
		// Counted as the hook saw it (a probe found the hook and Stats
		// disagreeing).
		assert.Equal(t, rejectedBefore+1, n.Stats().Rejected)
	})
}

func noopHandler(context.Context, *pubsub.Message) error { return nil }

// Found in review: a delivery to a subscription already removed on its
// node (its Unsubscribe not yet heard by the owner) was reported
// SubscriberGone without the hook.
func TestHandledHookSeesADeliveryToARemovedSubscription(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 0)
	rec := &hookRecorder{}
	for i := range 3 {
		c.AddNode(t, fmt.Sprintf("n%d", i), i, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(rec))...)
	}
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[1], "removed")
	sub := subscribe(t, c.Nodes[2], topic, noopHandler)
	// n2's Unsubscribe must not reach the owner before the publish does:
	// what n2 sends is held back meanwhile.
	c.Client(2).Stall(faultnet.Forward)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_ = sub.Unsubscribe(ctx) // removed on n2 at once; the request waits
	cancel()
	_, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckAccepted))
	require.NoError(t, err)
	h := rec.waitHandled(t, 1)
	assert.Equal(t, pubsub.SubscriberGone, h[0].Status)
	assert.Equal(t, sub.ID(), h[0].Subscriber)
	c.HealAll()
}
