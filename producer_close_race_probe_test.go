package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// gateCtx is a context whose Err blocks, from its second call on (the
// first is Produce's own check), until the gate opens: a producer's actor
// reads the contexts of the messages it cuts, so the test can hold the
// actor busy at a chosen moment.
type gateCtx struct {
	context.Context
	calls   atomic.Int32
	entered chan struct{}
	gate    chan struct{}
	once    sync.Once
}

func (c *gateCtx) Err() error {
	if c.calls.Add(1) > 1 {
		c.once.Do(func() { close(c.entered) })
		<-c.gate
	}
	return c.Context.Err()
}

// publishFailures is a PublishHook that reports each failed publish of
// topic prefix.
type publishFailures struct {
	prefix string
	ch     chan error
}

func (h publishFailures) OnPublish(i pubsub.PublishInfo) {
	if i.Err != nil && strings.HasPrefix(i.Topic, h.prefix) {
		select {
		case h.ch <- i.Err:
		default:
		}
	}
}

// A BatchingProducer's Close that gives up (its ctx ends) aborts the batch
// in flight. That batch had reached the owner, whose subscriber runs it, so
// Close's contract says its messages complete with ReasonTimeout (outcome
// unknown, wrapping ErrTimeout and ErrClosed). The aborted attempt reports
// context.Canceled; when that report reaches the producer's actor before
// the actor saw its lifetime end (the actor was busy, here reading a queued
// message's context), the actor took it for an ordinary failed attempt: the
// default FailBatchAndStop completed the message with ReasonCancelled
// ("dropped before it was published"), and a RetryBatch policy had Close
// complete it with ReasonClosed ("never sent") — although the handler ran
// it. The actor's choice between the two ready channels is random, so the
// scenario runs several times.
func TestProducerCloseGivingUpNeverCallsARunBatchUnpublished(t *testing.T) {
	c := newCluster(t, 1, 1)
	hook := publishFailures{prefix: "race-", ch: make(chan error, 1)}
	pub := c.AddNode(t, "pub", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithHooks(hook))...)
	c.WaitConverged(t, 10*time.Second)

	var (
		mu      sync.Mutex
		ran     = map[string]bool{}
		entered = make(chan string, 1)
		release = make(chan struct{})
	)
	topic := ownedBy(t, c.Nodes[0], "race")
	_, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		mu.Lock()
		ran[string(m.Data)] = true
		mu.Unlock()
		if strings.HasSuffix(string(m.Data), "/blocked") {
			entered <- string(m.Data)
			mu.Lock()
			rel := release
			mu.Unlock()
			select {
			case <-rel:
			case <-ctx.Done():
			}
		}
		return nil
	})
	require.NoError(t, err)
	// Each round needs its own release.
	policies := map[string]func(int, error) pubsub.ErrorDecision{
		"default": nil,
		"retry":   func(int, error) pubsub.ErrorDecision { return pubsub.RetryBatch(time.Hour) },
	}
	bad := 0
	for round := range 12 {
		for name, policy := range policies {
			mu.Lock()
			release = make(chan struct{})
			mu.Unlock()
			p, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{MaxInFlight: 2, OnPublishError: policy})
			require.NoError(t, err)
			// The first batch initializes the topic alone: the race needs
			// two in flight.
			_, err = p.Produce(context.Background(), []byte(fmt.Sprintf("%s-%d/warm", name, round))).Wait(ctxT(t))
			require.NoError(t, err)
			first := fmt.Sprintf("%s-%d/blocked", name, round)
			f1 := p.Produce(context.Background(), []byte(first))
			select {
			case got := <-entered:
				require.Equal(t, first, got)
			case <-time.After(10 * time.Second):
				t.Fatal("the first message never reached its handler")
			}
			// The second message is cut while the first is in flight:
			// reading its context holds the actor.
			gc := &gateCtx{Context: context.Background(), entered: make(chan struct{}), gate: make(chan struct{})}
			f2 := p.Produce(gc, []byte(fmt.Sprintf("%s-%d/second", name, round)))
			select {
			case <-gc.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the producer never cut the second message")
			}
			cctx, cancel := context.WithCancel(context.Background())
			closed := make(chan error, 1)
			go func() { closed <- p.Close(cctx) }()
			cancel() // Close gives up: the attempt in flight is aborted
			select {
			case <-hook.ch: // the aborted attempt returned
			case <-time.After(10 * time.Second):
				buf := make([]byte, 1<<22)
				buf = buf[:runtime.Stack(buf, true)]
				t.Fatalf("the attempt in flight was not aborted\n%s", buf)
			}
			close(gc.gate)
			select {
			case err := <-closed:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("round %d, %s policy: Close gave up on a batch in flight and returned %v, want context.Canceled", round, name, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Close did not return")
			}
			mu.Lock()
			close(release)
			mu.Unlock()
			ack, err := f1.Wait(ctxT(t))
			mu.Lock()
			run := ran[first]
			mu.Unlock()
			require.True(t, run)
			if ack.Reason != pubsub.ReasonTimeout || !errors.Is(err, pubsub.ErrTimeout) || !errors.Is(err, pubsub.ErrClosed) {
				bad++
				t.Errorf("round %d, %s policy: a message its handler ran, in flight when Close gave up, completed %s: %v; want ReasonTimeout wrapping ErrTimeout and ErrClosed", round, name, ack.Reason, err)
			}
			ack, err = f2.Wait(ctxT(t))
			require.Error(t, err)
			require.ErrorIs(t, err, ack.Reason.Err())
		}
	}
	// The handler of the last round may still be returning.
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(entered) == 0 }, "a handler entered late")
	t.Logf("%d of 24 rounds completed a run message as unpublished", bad)
}
