package pubsub_test

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// lpWithin runs fn and fails the test, with every goroutine's stack, if it
// has not returned within d.
func lpWithin(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		buf := make([]byte, 1<<22)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("%s did not return within %v\n%s", what, d, buf)
	}
}

var lpLevels = []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone}

// Probe: after Close, every method returns promptly with an error wrapping
// ErrClosed (or does nothing), never panics or hangs.
func TestLifecycleProbeEveryMethodAfterClose(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0 := c.Nodes[0]
	ctx := ctxT(t)
	own := ownedBy(t, n0, "own")
	rem := ownedBy(t, c.Nodes[1], "rem")
	s, err := n0.Subscribe(ctx, own, func(context.Context, *pubsub.Message) error { return nil })
	require.NoError(t, err)
	s2, err := n0.Subscribe(ctx, rem, func(context.Context, *pubsub.Message) error { return nil })
	require.NoError(t, err)
	c.CloseNode(t, 0)

	check := func(what string, err error) {
		t.Helper()
		assert.ErrorIs(t, err, pubsub.ErrClosed, what)
	}
	lpWithin(t, 10*time.Second, "calls on a closed node", func() {
		for _, topic := range []string{own, rem} {
			_, err := n0.Publish(ctx, topic, []byte("x"))
			check("Publish "+topic, err)
			_, err = n0.PublishBatch(ctx, topic, [][]byte{[]byte("x")})
			check("PublishBatch "+topic, err)
			for _, l := range lpLevels {
				_, err = n0.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(l))
				check("PublishMessages "+l.String()+" "+topic, err)
			}
			sub, err := n0.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil })
			check("Subscribe "+topic, err)
			assert.Nil(t, sub)
			check("Initialize "+topic, n0.Initialize(ctx, topic))
			_, err = n0.TopicStats(ctx, topic)
			check("TopicStats "+topic, err)

			tp, err := pubsub.NewTopic(n0, topic, pubsub.JSONCodec[int]())
			require.NoError(t, err)
			_, err = tp.Publish(ctx, 1)
			check("Topic.Publish", err)
			_, err = tp.Subscribe(ctx, func(context.Context, int, *pubsub.Message) error { return nil })
			check("Topic.Subscribe", err)

			for _, l := range lpLevels {
				p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{AckLevel: l})
				if err != nil {
					check("NewBatchingProducer", err)
					continue
				}
				f := p.Produce(ctx, []byte("x"))
				_, err = f.Wait(ctx)
				check("Produce "+l.String(), err)
				assert.NoError(t, p.Flush(ctx))
				assert.NoError(t, p.Close(ctx))
			}
			tpp, err := pubsub.NewTypedProducer(tp, pubsub.ProducerConfig{})
			require.NoError(t, err)
			_, err = tpp.Produce(ctx, 3).Wait(ctx)
			check("TypedProducer.Produce", err)
			assert.NoError(t, tpp.Close(ctx))
		}
		_, err := n0.Topics(ctx)
		check("Topics", err)
		_, err = n0.OwnerOf(own)
		_ = err // documented either way
		_ = n0.Members()
		_ = n0.Stats()
		cancel := n0.Events().Subscribe(func(pubsub.Event) {})
		cancel()
		assert.NoError(t, s.Unsubscribe(ctx), "Unsubscribe after Close")
		assert.NoError(t, s2.Unsubscribe(ctx), "Unsubscribe after Close")
		assert.ErrorIs(t, s.Err(), pubsub.ErrClosed)
		assert.NoError(t, n0.Close(ctx), "second Close")
	})
}

// Probe: a context already cancelled, or with a deadline in the past, makes
// every blocking call return at once with an error wrapping the context's
// error.
func TestLifecycleProbeDeadContexts(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0 := c.Nodes[0]
	own := ownedBy(t, n0, "own")
	rem := ownedBy(t, c.Nodes[1], "rem")
	live := ctxT(t)
	s, err := n0.Subscribe(live, own, func(context.Context, *pubsub.Message) error { return nil })
	require.NoError(t, err)

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	past, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()

	for _, dc := range []struct {
		name string
		ctx  context.Context
		want error
	}{{"cancelled", cancelled, context.Canceled}, {"past", past, context.DeadlineExceeded}} {
		ctx := dc.ctx
		check := func(what string, err error) {
			t.Helper()
			assert.ErrorIs(t, err, dc.want, "%s %s: %v", dc.name, what, err)
		}
		lpWithin(t, 5*time.Second, "calls with a "+dc.name+" context", func() {
			for _, topic := range []string{own, rem} {
				ack, err := n0.Publish(ctx, topic, []byte("x"))
				check("Publish "+topic, err)
				if err != nil {
					assert.ErrorIs(t, err, ack.Reason.Err())
				}
				for _, l := range lpLevels {
					ack, err = n0.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(l))
					check("PublishMessages "+l.String()+" "+topic, err)
					if err != nil {
						assert.ErrorIs(t, err, ack.Reason.Err())
					}
				}
				sub, err := n0.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil })
				check("Subscribe "+topic, err)
				assert.Nil(t, sub)
				check("Initialize "+topic, n0.Initialize(ctx, topic))
				_, err = n0.TopicStats(ctx, topic)
				check("TopicStats "+topic, err)
				tp, err := pubsub.NewTopic(n0, topic, pubsub.JSONCodec[int]())
				require.NoError(t, err)
				_, err = tp.Publish(ctx, 1)
				check("Topic.Publish", err)
				_, err = tp.Subscribe(ctx, func(context.Context, int, *pubsub.Message) error { return nil })
				check("Topic.Subscribe", err)

				p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{})
				require.NoError(t, err)
				ack, err = p.Produce(ctx, []byte("x")).Wait(live)
				check("Produce", err)
				if err != nil {
					assert.ErrorIs(t, err, ack.Reason.Err())
				}
				f := p.Produce(live, []byte("y"))
				_ = p.Flush(ctx)
				_, err = f.Wait(live)
				assert.NoError(t, err)
				f = p.Produce(live, []byte("z"))
				err = p.Close(ctx)
				_ = err
				ack, err = f.Wait(live)
				if err != nil {
					assert.ErrorIs(t, err, ack.Reason.Err())
				}
			}
			_, err := n0.Topics(ctx)
			check("Topics", err)
		})
	}
	lpWithin(t, 5*time.Second, "Unsubscribe with a cancelled context", func() {
		err := s.Unsubscribe(cancelled)
		t.Logf("Unsubscribe(cancelled) = %v", err)
		if err != nil {
			assert.ErrorIs(t, err, context.Canceled)
		}
	})
	nc := c.Conns[0]
	lpWithin(t, 5*time.Second, "Join with a cancelled context", func() {
		n, err := pubsub.Join(cancelled, nc, append(fast, pubsub.WithNodeID("late"))...)
		assert.ErrorIs(t, err, context.Canceled)
		assert.Nil(t, n)
		n, err = pubsub.Join(past, nc, append(fast, pubsub.WithNodeID("late2"))...)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Nil(t, n)
	})
	lpWithin(t, 15*time.Second, "Close with a cancelled context", func() {
		err := n0.Close(cancelled)
		t.Logf("Close(cancelled) = %v", err)
		assert.ErrorIs(t, err, context.Canceled)
		_, perr := n0.Publish(live, own, []byte("x"))
		assert.ErrorIs(t, perr, pubsub.ErrClosed)
		assert.NoError(t, n0.Close(live))
	})
	var gone error
	select {
	case <-s.Done():
	default:
		gone = errors.New("subscription not done")
	}
	assert.NoError(t, gone)
}

// Probe: a handler that unsubscribes its own subscription, with a local
// and a remote owner, at every ack level of the publish that runs it.
func TestLifecycleProbeHandlerUnsubscribesItself(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0 := c.Nodes[0]
	for _, topic := range []string{ownedBy(t, n0, "own"), ownedBy(t, c.Nodes[1], "rem")} {
		for _, l := range lpLevels {
			ctx := ctxT(t)
			var sub *pubsub.Subscription
			ready := make(chan struct{})
			res := make(chan error, 1)
			sub, err := n0.Subscribe(ctx, topic, func(hctx context.Context, m *pubsub.Message) error {
				<-ready
				res <- sub.Unsubscribe(hctx)
				return nil
			})
			require.NoError(t, err)
			close(ready)
			lpWithin(t, 15*time.Second, "publish to a handler unsubscribing itself", func() {
				ack, err := n0.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(l))
				t.Logf("%s %s: ack %+v err %v", topic, l, ack, err)
				select {
				case err := <-res:
					assert.NoError(t, err, "Unsubscribe from the handler")
				case <-time.After(10 * time.Second):
					t.Errorf("handler's Unsubscribe did not return")
				}
			})
		}
	}
}

// Probe: a handler that closes its own node. Close waits for running
// handlers, the calling one included, so it returns only when its ctx
// ends: with the handler's own ctx, which Close cancels, at once, with
// the node closed. (With context.Background it never returns.)
func TestLifecycleProbeHandlerClosesItsNode(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0 := c.Nodes[0]
	topic := ownedBy(t, c.Nodes[1], "rem")
	res := make(chan error, 1)
	_, err := n0.Subscribe(ctxT(t), topic, func(hctx context.Context, m *pubsub.Message) error {
		res <- n0.Close(hctx)
		return nil
	})
	require.NoError(t, err)
	lpWithin(t, 20*time.Second, "handler closing its node", func() {
		ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("x"))
		t.Logf("ack %+v err %v", ack, err)
		select {
		case err := <-res:
			t.Logf("Close from the handler: %v", err)
			assert.ErrorIs(t, err, context.Canceled)
		case <-time.After(15 * time.Second):
			t.Errorf("Close called from a handler with the handler's ctx did not return")
		}
		_, err = n0.Publish(ctxT(t), topic, []byte("y"))
		assert.ErrorIs(t, err, pubsub.ErrClosed)
	})
}

// Probe: the same node ID joins again right after its Close returned, on
// the same connection, and serves its subscriptions; a third Join with the
// live ID fails with ErrInvalidConfig; a bad prefix fails with
// ErrInvalidConfig; nothing leaks.
func TestLifecycleProbeRejoinSameID(t *testing.T) {
	c := newCluster(t, 1, 2)
	nc := c.Conns[0]
	ctx := ctxT(t)
	for round := range 3 {
		n, err := pubsub.Join(ctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID("twin"))...)
		require.NoError(t, err, "round %d", round)
		_, err = pubsub.Join(ctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID("twin"))...)
		assert.ErrorIs(t, err, pubsub.ErrInvalidConfig, "round %d: second live twin", round)
		topic := ownedBy(t, n, "twin")
		rec := newRecorder()
		s := subscribe(t, c.Nodes[1], topic, rec.handler)
		ack, err := c.Nodes[1].Publish(ctx, topic, []byte("x"))
		mustAccept(t, ack, err, 1)
		require.NoError(t, s.Unsubscribe(ctx))
		lpWithin(t, 15*time.Second, "Close of the twin", func() { require.NoError(t, n.Close(ctx)) })
	}
	for _, bad := range []string{"", "a b", "a.>", "*", "a..b", "UPPER"} {
		n, err := pubsub.Join(ctx, nc, pubsub.WithPrefix(bad))
		if err == nil {
			t.Logf("prefix %q accepted", bad)
			require.NoError(t, n.Close(ctx))
			continue
		}
		assert.ErrorIs(t, err, pubsub.ErrInvalidConfig, "prefix %q", bad)
	}
}

// Probe: the application drains the node's connection underneath it
// (nc.Drain), with a producer and subscriptions live; then Close.
func TestLifecycleProbeConnDrainedUnderNode(t *testing.T) {
	c := newCluster(t, 1, 2)
	n0 := c.Nodes[0]
	ctx := ctxT(t)
	own := ownedBy(t, n0, "own")
	rem := ownedBy(t, c.Nodes[1], "rem")
	s := subscribe(t, n0, rem, func(context.Context, *pubsub.Message) error { return nil })
	p, err := pubsub.NewBatchingProducer(n0, own, pubsub.ProducerConfig{})
	require.NoError(t, err)
	var futs []*pubsub.Produced
	for i := range 200 {
		futs = append(futs, p.Produce(ctx, msg(i)))
	}
	require.NoError(t, c.Conns[0].Drain())
	testcluster.WaitFor(t, 10*time.Second, c.Conns[0].IsClosed, "connection never closed after Drain")
	lpWithin(t, 20*time.Second, "calls after the drain", func() {
		select {
		case <-s.Done():
			assert.ErrorIs(t, s.Err(), pubsub.ErrClosed)
		case <-time.After(10 * time.Second):
			t.Errorf("subscription not ended %v after its connection closed", 10*time.Second)
		}
		_, err := n0.Publish(ctx, rem, []byte("x"))
		assert.ErrorIs(t, err, pubsub.ErrClosed)
		for _, f := range futs {
			ack, err := f.Wait(ctx)
			if err != nil {
				assert.ErrorIs(t, err, ack.Reason.Err())
			}
		}
		assert.NoError(t, p.Close(ctx))
		err = n0.Close(ctx)
		t.Logf("Close after the drain: %v", err)
	})
}
