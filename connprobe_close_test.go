//go:build connprobe

package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

var cpSentinels = []error{pubsub.ErrClosed, pubsub.ErrTimeout, pubsub.ErrTopicUnavailable, pubsub.ErrQueueFull,
	pubsub.ErrCancelled, pubsub.ErrTooLarge, pubsub.ErrInvalidTopic, pubsub.ErrInvalidMessage}

func cpWrapsSentinel(err error) bool {
	for _, s := range cpSentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// Probe: the application closes the node's *nats.Conn underneath a live
// node with producers at every ack level, direct publishes and subscribes
// in flight.
func TestProbeConnClosedUnderLiveNode(t *testing.T) {
	c := newCluster(t, 3, 3)
	n0 := c.Nodes[0]
	remote := ownedBy(t, c.Nodes[1], "remote")
	local := ownedBy(t, n0, "local")
	rec := newRecorder()
	subscribe(t, c.Nodes[2], remote, rec.handler)
	subscribe(t, c.Nodes[2], local, rec.handler)
	s0 := subscribe(t, n0, remote, rec.handler)

	levels := []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone}
	var prods []*pubsub.BatchingProducer
	for _, topic := range []string{remote, local} {
		for _, l := range levels {
			p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 50, MaxQueueSize: 1_000_000})
			require.NoError(t, err)
			prods = append(prods, p)
		}
	}
	ctx := context.Background()
	var futs []*pubsub.Produced
	var futsMu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var direct [3]atomic.Int64
	var directBad []string
	var dmu sync.Mutex
	for pi, p := range prods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				f := p.Produce(ctx, []byte(fmt.Sprintf("p%d-%d", pi, i)))
				futsMu.Lock()
				futs = append(futs, f)
				futsMu.Unlock()
				if i%200 == 199 {
					_, _ = f.Wait(ctx) // pace a little
				}
			}
		}()
	}
	for li, l := range levels {
		for _, topic := range []string{remote, local} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
					ack, err := n0.PublishMessages(cctx, topic, []pubsub.Outgoing{{Data: []byte(fmt.Sprintf("d%d-%d", li, i))}}, pubsub.WithAck(l))
					cancel()
					if err != nil {
						direct[li].Add(1)
						if !errors.Is(err, ack.Reason.Err()) || !cpWrapsSentinel(err) || ack.Status != pubsub.Rejected {
							dmu.Lock()
							directBad = append(directBad, fmt.Sprintf("%v: ack %+v err %v", l, ack, err))
							dmu.Unlock()
						}
					}
				}
			}()
		}
	}
	var subErrs []error
	var smu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			topic := remote
			if i%2 == 1 {
				topic = local
			}
			s, err := n0.Subscribe(cctx, topic, func(context.Context, *pubsub.Message) error { return nil })
			cancel()
			if err != nil {
				smu.Lock()
				subErrs = append(subErrs, err)
				smu.Unlock()
				continue
			}
			_ = s // left live: the node's stop must end it
		}
	}()
	// Let traffic flow, then close the connection underneath.
	testcluster.WaitFor(t, 20*time.Second, func() bool { return rec.total() > 2000 }, "no traffic before the close")
	c.Conns[0].Close()
	select {
	case <-s0.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("subscription on n0 not ended 10 s after its connection closed")
	}
	assert.ErrorIs(t, s0.Err(), pubsub.ErrClosed)
	time.Sleep(200 * time.Millisecond) // probe: let the callers hit the closed node
	close(stop)
	wg.Wait()

	// Every future completes, with a sentinel.
	futsMu.Lock()
	all := futs
	futsMu.Unlock()
	reasons := map[string]int{}
	for _, f := range all {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ack, err := f.Wait(wctx)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, pubsub.ErrTimeout) {
			t.Fatalf("a future did not complete within 30 s of the connection closing")
		}
		if err != nil {
			reasons[ack.Reason.String()]++
			if !cpWrapsSentinel(err) || !errors.Is(err, ack.Reason.Err()) {
				t.Errorf("future error %v (ack %+v) wraps no sentinel / not its reason", err, ack)
			}
		} else {
			reasons["ok"]++
		}
	}
	t.Logf("futures: %d, outcomes %v; direct rejections %v %v %v", len(all), reasons, direct[0].Load(), direct[1].Load(), direct[2].Load())
	for _, b := range directBad {
		t.Errorf("direct: %s", b)
	}
	for _, err := range subErrs {
		if !errors.Is(err, pubsub.ErrClosed) && !cpWrapsSentinel(err) {
			t.Errorf("subscribe error wraps no sentinel: %v", err)
		}
	}
	t.Logf("subscribe errors: %d", len(subErrs))
	// After: clear errors.
	f := prods[0].Produce(ctx, []byte("after"))
	_, err := f.Wait(ctxT(t))
	assert.ErrorIs(t, err, pubsub.ErrClosed, "Produce after the connection closed")
	_, err = n0.Publish(ctxT(t), remote, []byte("after"))
	assert.ErrorIs(t, err, pubsub.ErrClosed)
	_, err = n0.PublishMessages(ctxT(t), remote, []pubsub.Outgoing{{Data: []byte("after")}}, pubsub.WithAck(pubsub.AckNone))
	assert.ErrorIs(t, err, pubsub.ErrClosed)
	_, err = n0.Subscribe(ctxT(t), remote, rec.handler)
	assert.ErrorIs(t, err, pubsub.ErrClosed)
	for _, p := range prods {
		cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		err := p.Close(cctx)
		cancel()
		if err != nil {
			t.Logf("producer Close: %v", err)
			assert.False(t, errors.Is(err, context.DeadlineExceeded), "producer Close hung: %v", err)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	start := time.Now()
	err = n0.Close(cctx)
	t.Logf("node Close after the connection closed: %v in %v", err, time.Since(start))
	assert.NoError(t, err)
	// The others serve on.
	publishUntilAccepted(t, c.Nodes[1], remote, []byte("still"), 1, 10*time.Second)
}
