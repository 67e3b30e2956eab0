package pubsub

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// A BatchingProducer's Close whose ctx ends must return even when the
// Publisher's call in flight (or its Initializer's) ignores its cancelled
// ctx: the call is left running, its batch completes, and the producer's
// own goroutine ends. Before, Close waited for the call forever. A call
// that honours its ctx, if late, is still waited for (abortGrace): its
// answer decides the outcome.
func TestProducerCloseReturnsWhenThePublisherIgnoresItsContext(t *testing.T) {
	leakcheck.Parallel(t)
	type script struct {
		publish func(ctx context.Context) (PublishAck, error) // nil: accepted
		init    func(bp *BatchingProducer) error              // nil: no Initializer call scripted
	}
	cases := []struct {
		name string
		// script scripts the calls; ignoreCtx blocks until the test
		// releases it, whatever the call's ctx says.
		script    func(ignoreCtx func()) script
		sentinel  error
		reason    Reason
		ignored   bool // the error says the call was left running
		published bool // the publish call was made
	}{
		{
			name: "publish ignores its ctx",
			script: func(ignoreCtx func()) script {
				return script{publish: func(context.Context) (PublishAck, error) {
					ignoreCtx()
					return PublishAck{Topic: "test-topic", Status: Accepted, Messages: 1, Delivered: 1}, nil
				}}
			},
			// The call may have published it: outcome unknown.
			sentinel: ErrTimeout, reason: ReasonTimeout, ignored: true, published: true,
		},
		{
			name: "initialize ignores its ctx",
			script: func(ignoreCtx func()) script {
				return script{init: func(*BatchingProducer) error { ignoreCtx(); return nil }}
			},
			// Nothing is published before Initialize returns.
			sentinel: ErrClosed, reason: ReasonClosed, ignored: true,
		},
		{
			name: "publish honours its ctx late",
			script: func(func()) script {
				return script{publish: func(ctx context.Context) (PublishAck, error) {
					<-ctx.Done()
					// Elapsed time is the point: well within abortGrace.
					time.Sleep(abortGrace / 5)
					return PublishAck{Topic: "test-topic", Status: Rejected, Reason: ReasonCancelled},
						fmt.Errorf("%w: no owner answered: %w", ErrTopicUnavailable, ctx.Err())
				}}
			},
			// Its refusal is heard: nothing was published.
			sentinel: ErrTopicUnavailable, reason: ReasonClosed, published: true,
		},
		{
			name: "initialize returns after the lifetime ended",
			script: func(func()) script {
				return script{init: func(bp *BatchingProducer) error { <-bp.ctx.Done(); return nil }}
			},
			// No publish follows, which would wait a second abortGrace.
			sentinel: ErrClosed, reason: ReasonClosed,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			release := make(chan struct{})
			unblock := sync.OnceFunc(func() { close(release) })
			returned := make(chan struct{})
			ignoreCtx := func() {
				<-release
				close(returned)
			}
			sc := tc.script(ignoreCtx)
			bpRef := make(chan *BatchingProducer, 1)
			entered := make(chan struct{}, 2)
			mock := newMock()
			mock.fn = func(ctx context.Context, _ int, _ [][]byte) (PublishAck, error) {
				entered <- struct{}{}
				if sc.publish == nil {
					return PublishAck{Topic: "test-topic", Status: Accepted, Messages: 1, Delivered: 1}, nil
				}
				return sc.publish(ctx)
			}
			pub := &initPub{mockPub: mock}
			if sc.init != nil {
				pub.initFn = func(int) error {
					entered <- struct{}{}
					bp := <-bpRef
					return sc.init(bp)
				}
			}
			bp, err := NewBatchingProducer(pub, "test-topic", ProducerConfig{})
			require.NoError(t, err)
			bpRef <- bp
			// A stuck call's goroutine outlives Close; the leak check
			// runs after this, once the call has returned.
			t.Cleanup(func() {
				unblock()
				if tc.ignored {
					select {
					case <-returned:
					case <-time.After(prodWait):
						t.Errorf("the call did not return once released")
					}
				}
			})

			fut := bp.Produce(context.Background(), []byte("m"))
			select {
			case <-entered:
			case <-time.After(prodWait):
				t.Fatal("the scripted call never started")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			closed := make(chan error, 1)
			start := time.Now()
			go func() { closed <- bp.Close(ctx) }()
			select {
			case err := <-closed:
				require.ErrorIs(t, err, context.DeadlineExceeded, "Close gave up: its ctx's error")
				// Elapsed time is the point: ctx (100 ms) plus at most
				// abortGrace, with a generous bound for a loaded machine.
				assert.Less(t, time.Since(start), abortGrace+5*time.Second)
			case <-time.After(abortGrace + 10*time.Second):
				t.Fatalf("Close did not return %v after its ctx ended", abortGrace+10*time.Second)
			}

			ack, err := prodDone(t, fut, "after Close")
			prodExpectErr(t, ack, err, tc.sentinel, tc.reason)
			require.ErrorIs(t, err, ErrClosed)
			if tc.ignored {
				assert.Contains(t, err.Error(), "ignored its cancelled context")
			} else {
				assert.NotContains(t, err.Error(), "ignored its cancelled context")
			}
			assert.Equal(t, tc.published, mock.callCount() > 0, "publish calls: %d", mock.callCount())
			_, err = prodDone(t, bp.Produce(context.Background(), []byte("late")), "Produce after Close")
			require.ErrorIs(t, err, ErrClosed, "Produce after Close")
		})
	}
}
