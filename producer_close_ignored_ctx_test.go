package pubsub

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// A BatchingProducer's Close whose ctx ends must return even when the
// Publisher's call in flight (or its Initializer's) ignores its cancelled
// ctx: the call is left running, its batch completes with an unknown
// outcome, and the producer's own goroutine ends. Before, Close waited for
// the call forever.
func TestProducerCloseReturnsWhenThePublisherIgnoresItsContext(t *testing.T) {
	leakcheck.Parallel(t)
	for _, stuck := range []string{"publish", "initialize"} {
		t.Run(stuck, func(t *testing.T) {
			release := make(chan struct{})
			unblock := sync.OnceFunc(func() { close(release) })
			entered := make(chan struct{}, 1)
			returned := make(chan struct{})
			ignoreCtx := func() {
				entered <- struct{}{}
				<-release // ignores its ctx
				close(returned)
			}
			mock := newMock()
			pub := &initPub{mockPub: mock}
			if stuck == "publish" {
				mock.fn = func(context.Context, int, [][]byte) (PublishAck, error) {
					ignoreCtx()
					return PublishAck{Topic: "test-topic", Status: Accepted, Messages: 1, Delivered: 1}, nil
				}
			} else {
				pub.initFn = func(int) error { ignoreCtx(); return nil }
			}
			bp, err := NewBatchingProducer(pub, "test-topic", ProducerConfig{})
			require.NoError(t, err)
			// The stuck call's goroutine outlives Close; the leak check
			// runs after this, once the call has returned.
			t.Cleanup(func() {
				unblock()
				select {
				case <-returned:
				case <-time.After(prodWait):
					t.Errorf("the %s call did not return once released", stuck)
				}
			})

			fut := bp.Produce(context.Background(), []byte("m"))
			select {
			case <-entered:
			case <-time.After(prodWait):
				t.Fatalf("the %s call never started", stuck)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			closed := make(chan error, 1)
			start := time.Now()
			go func() { closed <- bp.Close(ctx) }()
			select {
			case err := <-closed:
				require.ErrorIs(t, err, context.DeadlineExceeded, "Close gave up: its ctx's error")
				// Elapsed time is the point: ctx (100 ms) plus abortGrace,
				// with a generous bound for a loaded machine.
				assert.Less(t, time.Since(start), abortGrace+5*time.Second)
			case <-time.After(abortGrace + 10*time.Second):
				t.Fatalf("Close did not return %v after its ctx ended: it waits for a %s call that ignores its ctx", abortGrace+10*time.Second, stuck)
			}

			ack, err := prodDone(t, fut, "after Close")
			if stuck == "publish" {
				// The call may have published it: outcome unknown.
				prodExpectErr(t, ack, err, ErrTimeout, ReasonTimeout)
			} else {
				// Nothing was published: the Initialize never returned.
				prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
			}
			require.ErrorIs(t, err, ErrClosed)
			assert.True(t, strings.Contains(err.Error(), "ignored its cancelled context"), err.Error())
			_, err = prodDone(t, bp.Produce(context.Background(), []byte("late")), "Produce after Close")
			require.ErrorIs(t, err, ErrClosed, "Produce after Close")
		})
	}
}
