package pubsub_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Probes of user code running on the library's goroutines (handlers,
// event listeners, hooks, codecs) and of the API called from inside it.

// rpTimeout is the SubscriberTimeout of these probes: short, so a handler
// waiting for itself is cut off quickly.
const rpTimeout = 600 * time.Millisecond

// rpModes makes topics named "alo-..." at-least-once.
func rpModes(topic string) pubsub.DeliveryMode {
	if strings.HasPrefix(topic, "alo-") {
		return pubsub.AtLeastOnce
	}
	return pubsub.AtMostOnce
}

type rpResult struct {
	ack     pubsub.PublishAck
	err     error
	elapsed time.Duration
}

// Probe: a handler that publishes to its own topic at AckDelivered and
// waits, with its own ctx. The new batch queues in the mailbox the handler
// is holding, so the publish cannot be Delivered: it must end by the
// handler's deadline (answered at the publisher's deadline, the subscriber
// listed as Timeout), the outer batch must still count as Delivered, the
// inner one must run once the handler returns, the subscription must not
// be evicted, and a subscription on another topic of the same node must
// keep receiving meanwhile. A fast subscription to the same topic on the
// same node is listed as Timeout beside it in the inner ack (a node
// reports its subscribers together, README "Guarantees" 4).
func TestReentrantProbeHandlerPublishesToItsOwnTopic(t *testing.T) {
	leakcheck.Parallel(t)
	// Longer than rpTimeout: the publish to another topic below must
	// finish while the handler still waits for itself, and under two
	// loaded copies of the suite it outlasted what was left of a 600 ms
	// deadline after the handler's first publish.
	const timeout = 2 * time.Second
	c := newCluster(t, 1, 2, pubsub.WithSubscriberTimeout(timeout), pubsub.WithDeliveryMode(rpModes))
	n0 := c.Nodes[0]
	for _, owner := range []int{0, 1} {
		for _, mode := range []string{"amo-", "alo-"} {
			topic := ownedBy(t, c.Nodes[owner], mode+"self")
			other := ownedBy(t, c.Nodes[1-owner], mode+"other")
			t.Run(topic, func(t *testing.T) {
				ctx := ctxT(t)
				otherRec := newRecorder()
				otherSub := subscribe(t, n0, other, otherRec.handler)
				inner := make(chan rpResult, 1)
				blocked := make(chan struct{})
				var innerRan, innerReturned atomic.Bool
				sub := subscribe(t, n0, topic, func(hctx context.Context, m *pubsub.Message) error {
					if string(m.Data) == "inner" {
						innerRan.Store(true)
						return nil
					}
					// Another topic whose subscriber is on this node: runs.
					ack, err := n0.Publish(hctx, other, []byte("from-handler"))
					if err != nil || ack.Delivered != 1 {
						t.Errorf("handler's publish to another topic: ack %+v err %v", ack, err)
					}
					close(blocked)
					start := time.Now()
					ack, err = n0.Publish(hctx, topic, []byte("inner"))
					innerReturned.Store(true)
					inner <- rpResult{ack, err, time.Since(start)}
					return nil
				})
				sibling := subscribe(t, n0, topic, func(context.Context, *pubsub.Message) error { return nil })
				outerDone := make(chan rpResult, 1)
				go func() {
					start := time.Now()
					ack, err := c.Nodes[1].Publish(ctx, topic, []byte("outer"))
					outerDone <- rpResult{ack, err, time.Since(start)}
				}()
				<-blocked
				// While the handler waits for itself, another topic of its
				// node delivers.
				ack, err := c.Nodes[1].Publish(ctx, other, []byte("beside"))
				mustAccept(t, ack, err, 1)
				assert.False(t, innerReturned.Load(), "the handler's own publish returned before a publish to another topic")
				var r rpResult
				select {
				case r = <-inner:
				case <-time.After(5 * timeout):
					t.Fatal("the handler's publish to its own topic did not return")
				}
				t.Logf("inner publish: %v, ack %+v, err %v", r.elapsed, r.ack, r.err)
				// Answered at the handler's deadline (early, a quarter
				// ahead), the subscriber listed as Timeout, outcome unknown.
				require.NoError(t, r.err)
				assert.Equal(t, 0, r.ack.Delivered)
				// A fast subscription on the same node is reported with it.
				assert.ElementsMatch(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}, {Subscriber: sibling.ID(), Status: pubsub.Timeout}}, r.ack.Failures)
				assert.Less(t, r.elapsed, timeout)
				// So the handler returned in time: the outer batch ran.
				o := <-outerDone
				t.Logf("outer publish: %v, ack %+v, err %v", o.elapsed, o.ack, o.err)
				mustAccept(t, o.ack, o.err, 2)
				testcluster.WaitFor(t, 5*time.Second, innerRan.Load, "the inner message never ran")
				select {
				case <-sub.Done():
					t.Fatalf("subscription ended: %v", sub.Err())
				default:
				}
				assert.Equal(t, []string{"from-handler", "beside"}, otherRec.of(otherSub.ID()))
				require.NoError(t, sub.Unsubscribe(ctx))
				require.NoError(t, sibling.Unsubscribe(ctx))
			})
		}
	}
}

// Probe: the same handler publishing to its own topic with a ctx that has
// no deadline (context.Background). The publish then waits for the inner
// batch's SubscriberTimeout (its Timeout is certain: it cannot start before
// the handler returns), so the handler overruns its own deadline; with
// EvictAfter 1 the one call evicts the subscription.
func TestReentrantProbeHandlerPublishesToItsOwnTopicWithoutDeadline(t *testing.T) {
	const timeout = 300 * time.Millisecond
	c := newCluster(t, 1, 2, pubsub.WithSubscriberTimeout(timeout), pubsub.WithEvictAfter(1))
	n0 := c.Nodes[0]
	for _, owner := range []int{0, 1} {
		topic := ownedBy(t, c.Nodes[owner], "nodeadline")
		t.Run(topic, func(t *testing.T) {
			inner := make(chan rpResult, 1)
			overrun := make(chan time.Duration, 1)
			sub := subscribe(t, n0, topic, func(hctx context.Context, m *pubsub.Message) error {
				if string(m.Data) == "inner" {
					return nil
				}
				start := time.Now()
				ack, err := n0.Publish(context.Background(), topic, []byte("inner"))
				inner <- rpResult{ack, err, time.Since(start)}
				dl, _ := hctx.Deadline()
				overrun <- time.Since(dl)
				return nil
			})
			ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("outer"))
			t.Logf("outer publish: ack %+v, err %v", ack, err)
			require.NoError(t, err)
			r := <-inner
			t.Logf("inner publish: %v, ack %+v, err %v", r.elapsed, r.ack, r.err)
			require.NoError(t, r.err)
			// Timeout, or SubscriberGone when the outer batch's Timeout
			// evicted it first.
			require.Len(t, r.ack.Failures, 1)
			assert.Equal(t, sub.ID(), r.ack.Failures[0].Subscriber)
			assert.Contains(t, []pubsub.DeliveryStatus{pubsub.Timeout, pubsub.SubscriberGone}, r.ack.Failures[0].Status)
			assert.GreaterOrEqual(t, r.elapsed, timeout*9/10)
			assert.GreaterOrEqual(t, <-overrun, time.Duration(0), "the handler returned before its deadline")
			select {
			case <-sub.Done():
				assert.ErrorIs(t, sub.Err(), pubsub.ErrEvicted)
			case <-time.After(5 * time.Second):
				t.Fatal("a handler waiting for itself was not evicted")
			}
		})
	}
}

// Probe: a handler that subscribes to a new topic and publishes to it, and
// one that produces to its own topic through a BatchingProducer and waits
// for the future, flushes or closes the producer, each with its own ctx.
func TestReentrantProbeHandlerSubscribesAndProduces(t *testing.T) {
	c := newCluster(t, 1, 2, pubsub.WithSubscriberTimeout(rpTimeout))
	n0 := c.Nodes[0]
	t.Run("subscribe", func(t *testing.T) {
		topic := ownedBy(t, c.Nodes[1], "sub-outer")
		fresh := ownedBy(t, c.Nodes[1], "sub-fresh")
		rec := newRecorder()
		res := make(chan error, 1)
		subscribe(t, n0, topic, func(hctx context.Context, m *pubsub.Message) error {
			s, err := n0.Subscribe(hctx, fresh, rec.handler)
			if err != nil {
				res <- err
				return nil
			}
			ack, err := n0.Publish(hctx, fresh, []byte("fresh"))
			if err == nil && ack.Delivered != 1 {
				err = errors.New("not delivered")
			}
			res <- err
			return s.Unsubscribe(hctx)
		})
		ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("outer"))
		mustAccept(t, ack, err, 1)
		require.NoError(t, <-res)
		assert.Equal(t, 1, rec.total())
	})
	for _, how := range []string{"wait", "flush", "close"} {
		t.Run(how, func(t *testing.T) {
			topic := ownedBy(t, c.Nodes[1], "prod-"+how)
			p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{})
			require.NoError(t, err)
			var f *pubsub.Produced
			res := make(chan rpResult, 1)
			sub := subscribe(t, n0, topic, func(hctx context.Context, m *pubsub.Message) error {
				if string(m.Data) == "inner" {
					return nil
				}
				start := time.Now()
				f = p.Produce(hctx, []byte("inner"))
				var r rpResult
				switch how {
				case "wait":
					r.ack, r.err = f.Wait(hctx)
				case "flush":
					r.err = p.Flush(hctx)
				case "close":
					r.err = p.Close(hctx)
				}
				r.elapsed = time.Since(start)
				res <- r
				return nil
			})
			start := time.Now()
			ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("outer"))
			t.Logf("outer publish: %v, ack %+v, err %v", time.Since(start), ack, err)
			require.NoError(t, err)
			r := <-res
			t.Logf("%s from the handler: %v, ack %+v, err %v", how, r.elapsed, r.ack, r.err)
			// No answer before the handler's deadline on this path (the
			// producer's publish has its own deadline, PublishTimeout): the
			// wait ends at that deadline, with the handler's ctx, or with
			// the inner batch's own answer, due about as early (the inner
			// batch waited its SubscriberTimeout in the mailbox the handler
			// holds), which lists this subscription as Timeout. Which of
			// the two the waiting goroutine sees first is a race (1 of 45
			// runs under -race saw the answer, and then the handler may
			// return just before its deadline: the outer batch is
			// Delivered). A handler that returns with its ctx ended is
			// Timeout.
			assert.GreaterOrEqual(t, r.elapsed, rpTimeout*9/10)
			if r.err != nil {
				assert.ErrorIs(t, r.err, context.DeadlineExceeded)
				assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}}, ack.Failures)
			} else if ack.Delivered != 1 {
				assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}}, ack.Failures)
			}
			if r.err == nil && how == "wait" {
				assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}}, r.ack.Failures)
			}
			fa, ferr := f.Wait(ctxT(t))
			t.Logf("the future: ack %+v, err %v", fa, ferr)
			if ferr != nil {
				// Close cut the batch's publish short: outcome unknown.
				assert.Equal(t, "close", how, "only Close cuts the batch short")
				assert.ErrorIs(t, ferr, pubsub.ErrTimeout)
			} else if len(fa.Failures) != 0 {
				// Accepted: the inner batch ran once the handler returned
				// if its own deadline had not passed by then.
				assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}}, fa.Failures)
			}
			require.NoError(t, p.Close(ctxT(t)))
			select {
			case <-sub.Done():
				t.Fatalf("subscription ended: %v", sub.Err())
			default:
			}
		})
	}
}

// Probe: event listeners. One stuck in its callback while the node evicts
// hundreds of subscribers (every eviction, failure and removal an event)
// must not hold the data path up, and its losses are counted; one that
// calls the node's API from its callback (Subscribe again on eviction,
// Close) must not deadlock.
func TestReentrantProbeEventListeners(t *testing.T) {
	t.Run("stuck listener while evicting", func(t *testing.T) {
		c := newCluster(t, 1, 1, pubsub.WithEvictAfter(1))
		n := c.Nodes[0]
		release := make(chan struct{})
		stuck := make(chan struct{})
		var once atomic.Bool
		var told atomic.Uint64
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if once.CompareAndSwap(false, true) {
				close(stuck)
				<-release
			}
			if d, ok := e.(pubsub.EventsDropped); ok {
				told.Add(d.Dropped)
			}
		})
		defer cancel()
		const subs = 400 // 3 events each at least: past EventBufferSize
		failing := func(context.Context, *pubsub.Message) error { return errors.New("no") }
		ss := make([]*pubsub.Subscription, subs)
		for i := range ss {
			ss[i] = subscribe(t, n, "evicting", failing)
		}
		<-stuck
		ack, err := n.Publish(ctxT(t), "evicting", []byte("x"))
		require.NoError(t, err)
		assert.Len(t, ack.Failures, subs)
		for _, s := range ss {
			select {
			case <-s.Done():
				require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
			case <-time.After(5 * time.Second):
				t.Fatal("a failing subscriber was not evicted while a listener was stuck")
			}
		}
		dropped := n.Stats().EventsDropped
		assert.Greater(t, dropped, uint64(0))
		close(release)
		testcluster.WaitFor(t, 5*time.Second, func() bool { return told.Load() == n.Stats().EventsDropped },
			"listener told of %d dropped events, node counted %d", told.Load(), n.Stats().EventsDropped)
	})
	t.Run("listener subscribes again on eviction", func(t *testing.T) {
		c := newCluster(t, 1, 2, pubsub.WithEvictAfter(1))
		n := c.Nodes[0]
		topic := ownedBy(t, c.Nodes[1], "again")
		rec := newRecorder()
		again := make(chan error, 1)
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if ev, ok := e.(pubsub.SubscriberEvicted); ok && ev.Node == n.ID() {
				_, err := n.Subscribe(ctxT(t), topic, rec.handler)
				again <- err
			}
		})
		defer cancel()
		subscribe(t, n, topic, func(context.Context, *pubsub.Message) error { return errors.New("no") })
		_, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("fails"))
		require.NoError(t, err)
		require.NoError(t, <-again)
		ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("ok"))
		mustAccept(t, ack, err, 1)
		assert.Equal(t, 1, rec.total())
	})
	t.Run("listener closes its node", func(t *testing.T) {
		c := newCluster(t, 1, 2)
		n := c.Nodes[0]
		res := make(chan error, 1)
		var once atomic.Bool
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if _, ok := e.(pubsub.SubscriberAdded); ok && once.CompareAndSwap(false, true) {
				res <- n.Close(ctxT(t))
			}
		})
		subscribe(t, n, ownedBy(t, n, "closing"), newRecorder().handler)
		select {
		case err := <-res:
			assert.NoError(t, err, "Close from an event listener")
		case <-time.After(10 * time.Second):
			t.Fatal("Close from an event listener did not return")
		}
		cancel()
	})
}

// blockingHandledHook blocks OnHandled of one topic until released.
type blockingHandledHook struct {
	topic   string
	entered chan struct{}
	release chan struct{}
	once    atomic.Bool
}

func (h *blockingHandledHook) OnHandled(i pubsub.HandledInfo) {
	if i.Topic == h.topic {
		if h.once.CompareAndSwap(false, true) {
			close(h.entered)
		}
		<-h.release
	}
}

// Probe: a HandledHook blocked on a subscription's mailbox goroutine (after
// the outcome went to the owner) holds up only that subscription: another
// topic's subscriber on the node receives. A batch queued behind it waits
// for it, so the hook's time counts against that next batch's
// SubscriberTimeout.
func TestReentrantProbeBlockedHandledHook(t *testing.T) {
	c := newCluster(t, 1, 0)
	hook := &blockingHandledHook{topic: "hooked", entered: make(chan struct{}), release: make(chan struct{})}
	n := c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...),
		pubsub.WithSubscriberTimeout(300*time.Millisecond), pubsub.WithEvictAfter(100), pubsub.WithHooks(hook))...)
	defer func() {
		select {
		case <-hook.release:
		default:
			close(hook.release)
		}
	}()
	hooked := subscribe(t, n, "hooked", func(context.Context, *pubsub.Message) error { return nil })
	subscribe(t, n, "beside", func(context.Context, *pubsub.Message) error { return nil })
	ack, err := n.Publish(ctxT(t), "hooked", []byte("1"))
	mustAccept(t, ack, err, 1) // reported before the hook ran
	<-hook.entered
	ack, err = n.Publish(ctxT(t), "beside", []byte("x"))
	mustAccept(t, ack, err, 1)
	ack, err = n.Publish(ctxT(t), "hooked", []byte("2"))
	require.NoError(t, err)
	t.Logf("a batch behind the blocked hook: %+v", ack)
	assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: hooked.ID(), Status: pubsub.Timeout}}, ack.Failures)
	close(hook.release)
}

// A slow HandledHook never makes the batch it observes a Timeout, but the
// batches queued behind it in the mailbox wait for it, their
// SubscriberTimeout running: a hook slower than SubscriberTimeout evicts a
// subscription whose handler returns at once.
func TestReentrantProbeSlowHandledHookEvicts(t *testing.T) {
	c := newCluster(t, 1, 0)
	hook := &slowHandledHook{delay: 250 * time.Millisecond}
	n := c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...),
		pubsub.WithSubscriberTimeout(100*time.Millisecond), pubsub.WithEvictAfter(2), pubsub.WithHooks(hook))...)
	sub := subscribe(t, n, "t", func(context.Context, *pubsub.Message) error { return nil })
	ack, err := n.Publish(ctxT(t), "t", []byte("1"))
	mustAccept(t, ack, err, 1) // reported before its hook ran
	for i := 2; i <= 3; i++ {
		ack, err := n.Publish(ctxT(t), "t", []byte{byte('0' + i)})
		require.NoError(t, err)
		assert.Equal(t, 0, ack.Delivered, "batch %d behind the slow hook", i)
	}
	select {
	case <-sub.Done():
		assert.ErrorIs(t, sub.Err(), pubsub.ErrEvicted)
	case <-time.After(5 * time.Second):
		t.Fatal("not evicted")
	}
}

// panicPublishHook panics in OnPublish.
type panicPublishHook struct{ calls atomic.Int64 }

func (h *panicPublishHook) OnPublish(pubsub.PublishInfo) { h.calls.Add(1); panic("publish hook") }

// Probe: a PublishHook that panics on a BatchingProducer's goroutine is
// recovered: the producer goes on and its futures complete.
func TestReentrantProbePanickingPublishHookOnAProducer(t *testing.T) {
	c := newCluster(t, 1, 0)
	hook := &panicPublishHook{}
	n := c.AddNode(t, "n0", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(hook))...)
	rec := newRecorder()
	subscribe(t, n, "produced", rec.handler)
	p, err := pubsub.NewBatchingProducer(n, "produced", pubsub.ProducerConfig{})
	require.NoError(t, err)
	for i := range 3 {
		ack, err := p.Produce(ctxT(t), msg(i)).Wait(ctxT(t))
		mustAccept(t, ack, err, 1)
	}
	require.NoError(t, p.Close(ctxT(t)))
	assert.Equal(t, 3, rec.total())
	assert.GreaterOrEqual(t, hook.calls.Load(), int64(3))
}

// panicEncodeCodec panics in Encode for negative values.
type panicEncodeCodec struct{}

func (panicEncodeCodec) Encode(v int) ([]byte, error) {
	if v < 0 {
		panic("negative")
	}
	return []byte{byte(v)}, nil
}

func (panicEncodeCodec) Decode(b []byte) (int, error) {
	if len(b) != 1 {
		return 0, errors.New("one byte")
	}
	return int(b[0]), nil
}

// Probe: a codec whose Encode panics. Encode runs on the caller's
// goroutine (Topic.Publish, TypedProducer.Produce), not the library's;
// its panic used to reach the caller. It is now the codec's rejection of
// the value, as Decode's is (TestTypedEncodePanicIsAnInvalidMessage).
func TestReentrantProbePanickingEncode(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	typed, err := pubsub.NewTopic[int](n, "enc", panicEncodeCodec{})
	require.NoError(t, err)
	var got atomic.Int64
	_, err = typed.Subscribe(ctxT(t), func(_ context.Context, v int, _ *pubsub.Message) error { got.Add(1); return nil })
	require.NoError(t, err)
	// Nothing is queued or sent for the value whose encoding panicked.
	_, err = typed.Publish(ctxT(t), -1)
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	p, err := pubsub.NewTypedProducer(typed, pubsub.ProducerConfig{})
	require.NoError(t, err)
	_, err = p.Produce(ctxT(t), -1).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	ack, err := p.Produce(ctxT(t), 7).Wait(ctxT(t))
	mustAccept(t, ack, err, 1)
	require.NoError(t, p.Close(ctxT(t)))
	ack, err = typed.Publish(ctxT(t), 8)
	mustAccept(t, ack, err, 1)
	assert.Equal(t, int64(2), got.Load())
}

// A handler that returns when its ctx ends (waiting on ctx.Done(), or on
// a call given its ctx) finished past SubscriberTimeout: the owner is told
// Timeout whatever it returned (HandledInfo.Status, README "Hooks"). The
// deadline's callback that reports it runs on a goroutine of its own, and
// the handler's return raced it: the batch was reported Delivered.
func TestHandlerReturningAtItsDeadlineIsATimeout(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithSubscriberTimeout(20*time.Millisecond), pubsub.WithEvictAfter(1000))
	n := c.Nodes[0]
	sub := subscribe(t, n, "at-deadline", func(ctx context.Context, _ *pubsub.Message) error {
		<-ctx.Done()
		return nil
	})
	delivered := 0
	const rounds = 40
	for range rounds {
		ack, err := n.Publish(ctxT(t), "at-deadline", []byte("x"))
		require.NoError(t, err)
		if ack.Delivered == 1 {
			delivered++
			continue
		}
		assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: sub.ID(), Status: pubsub.Timeout}}, ack.Failures)
	}
	assert.Zero(t, delivered, "of %d batches whose handler returned at its deadline, %d were reported Delivered", rounds, delivered)
}
