//go:build connprobe

package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// cpOrder records, per subscriber and per stream, the indexes handled.
type cpOrder struct {
	mu  sync.Mutex
	got map[pubsub.SubscriberID]map[string][]int
}

func (r *cpOrder) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	s := string(m.Data)
	i := strings.LastIndexByte(s, '-')
	idx, err := strconv.Atoi(s[i+1:])
	if err != nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got[id] == nil {
		r.got[id] = map[string][]int{}
	}
	r.got[id][s[:i]] = append(r.got[id][s[:i]], idx)
	return nil
}

func (r *cpOrder) has(id pubsub.SubscriberID, stream string, idx int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, x := range r.got[id][stream] {
		if x == idx {
			return true
		}
	}
	return false
}

// Probe: a NATS server under a node shuts down; its connection reconnects
// to another while producers at every ack level and merged AckNone
// publishes stream, and subscribers receive.
func TestProbeReconnectWhileStreaming(t *testing.T) {
	for _, victim := range []int{0, 1, 2} { // producer's, owner's, subscriber's server
		t.Run(fmt.Sprintf("server%d", victim), func(t *testing.T) { cpReconnect(t, victim) })
	}
}

func cpReconnect(t *testing.T, victim int) {
	c := newCluster(t, 3, 3)
	n0 := c.Nodes[0]
	topic := ownedBy(t, c.Nodes[1], "rc")
	rec := &cpOrder{got: map[pubsub.SubscriberID]map[string][]int{}}
	subs := []*pubsub.Subscription{
		subscribe(t, c.Nodes[2], topic, rec.handler),
		subscribe(t, c.Nodes[1], topic, rec.handler),
		subscribe(t, c.Nodes[0], topic, rec.handler),
	}
	levels := []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone}
	type sent struct {
		f   *pubsub.Produced
		idx int
	}
	var mu sync.Mutex
	futs := map[string][]sent{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	ctx := context.Background()
	var prods []*pubsub.BatchingProducer
	for _, l := range levels {
		p, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 20,
			OnPublishError: func(attempt int, err error) pubsub.ErrorDecision {
				if attempt < 20 {
					return pubsub.RetryBatch(50 * time.Millisecond)
				}
				return pubsub.FailBatchAndContinue
			}})
		require.NoError(t, err)
		prods = append(prods, p)
		t.Cleanup(func() {
			cctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = p.Close(cctx)
		})
		stream := "p" + l.String()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				f := p.Produce(ctx, []byte(fmt.Sprintf("%s-%d", stream, i)))
				mu.Lock()
				futs[stream] = append(futs[stream], sent{f, i})
				mu.Unlock()
				if i%50 == 49 {
					_, _ = f.Wait(ctx)
				}
			}
		}()
	}
	// merged AckNone publishes, and direct publishes at the two other levels
	var directAccepted [3]atomic.Int64
	var directSent [3]atomic.Int64
	for li, l := range levels {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream := "d" + l.String()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				directSent[li].Add(1)
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				ack, err := n0.PublishMessages(cctx, topic, []pubsub.Outgoing{{Data: []byte(fmt.Sprintf("%s-%d", stream, i))}}, pubsub.WithAck(l))
				cancel()
				if err == nil {
					directAccepted[li].Add(1)
				} else if !errors.Is(err, ack.Reason.Err()) {
					t.Errorf("direct %v: err %v not its reason %v", l, err, ack.Reason)
				}
				if l == pubsub.AckNone && i%100 == 99 {
					time.Sleep(time.Millisecond) // probe: pace the AckNone loop (not synchronisation)
				}
			}
		}()
	}
	rej0 := n0.Stats().Rejected
	refused0 := c.Nodes[1].Stats().AckNoneRefused
	testcluster.WaitFor(t, 20*time.Second, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.got[subs[0].ID()]["pnone"]) > 500
	}, "no AckNone stream before the server loss")
	c.ShutdownServer(victim)
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		return c.Conns[victim].IsConnected() && c.Conns[victim].ConnectedUrl() != c.Servers.URL(victim)
	}, "node %d did not reconnect", victim)
	// keep streaming a while after the reconnect
	rec.mu.Lock()
	mark := len(rec.got[subs[0].ID()]["pnone"])
	rec.mu.Unlock()
	testcluster.WaitFor(t, 20*time.Second, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.got[subs[0].ID()]["pnone"]) > mark+500
	}, "the AckNone stream did not go on after the reconnect")
	close(stop)
	wg.Wait()
	for _, p := range prods {
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		require.NoError(t, p.Flush(fctx))
		cancel()
	}
	// Fence: one AckDelivered publish after everything, reaching everyone.
	publishUntilAccepted(t, n0, topic, []byte("fence-0"), 3, 10*time.Second)

	// Quiesce: wait until nothing more arrives for a second (AckNone and
	// AckAccepted batches may still be on their way after the fence).
	total := func() int {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		n := 0
		for _, m := range rec.got {
			for _, v := range m {
				n += len(v)
			}
		}
		return n
	}
	last, lastChange := total(), time.Now()
	for time.Since(lastChange) < time.Second {
		time.Sleep(10 * time.Millisecond)
		if n := total(); n != last {
			last, lastChange = n, time.Now()
		}
	}
	outcome := map[string]map[string]int{}
	for stream, fs := range futs {
		outcome[stream] = map[string]int{}
		for _, s := range fs {
			ack, err := s.f.Wait(ctx)
			if err != nil {
				outcome[stream]["err:"+ack.Reason.String()]++
				if !errors.Is(err, ack.Reason.Err()) {
					t.Errorf("%s-%d: err %v not its reason", stream, s.idx, err)
				}
				continue
			}
			outcome[stream]["ok"]++
			if stream == "pdelivered" {
				failed := map[pubsub.SubscriberID]bool{}
				for _, f := range ack.Failures {
					failed[f.Subscriber] = true
				}
				for _, sb := range subs {
					if !failed[sb.ID()] && !rec.has(sb.ID(), stream, s.idx) {
						t.Errorf("%s-%d: ack %+v counts %s delivered, its handler never ran it", stream, s.idx, ack, sb.ID())
					}
				}
			}
		}
	}
	// Order and duplicates per subscriber and stream; losses of accepted messages.
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for _, sb := range subs {
		for stream, idx := range rec.got[sb.ID()] {
			for k := 1; k < len(idx); k++ {
				if idx[k] <= idx[k-1] {
					t.Errorf("%s %s: %d after %d (duplicate or out of order)", sb.ID(), stream, idx[k], idx[k-1])
					break
				}
			}
		}
		line := []string{}
		for _, stream := range []string{"pdelivered", "paccepted", "pnone", "ddelivered", "daccepted", "dnone"} {
			line = append(line, fmt.Sprintf("%s=%d", stream, len(rec.got[sb.ID()][stream])))
		}
		t.Logf("%s (server %d) got %s", sb.ID(), map[string]int{"n0": 0, "n1": 1, "n2": 2}[sb.ID().Node], strings.Join(line, " "))
	}
	for stream, o := range outcome {
		t.Logf("futures %s: %v", stream, o)
	}
	for li, l := range levels {
		t.Logf("direct %v: sent %d accepted %d", l, directSent[li].Load(), directAccepted[li].Load())
	}
	t.Logf("n0 Rejected +%d, owner AckNoneRefused +%d, n%d InboxDropped %d", n0.Stats().Rejected-rej0, c.Nodes[1].Stats().AckNoneRefused-refused0, victim, c.Nodes[victim].Stats().InboxDropped)
	// Lost accepted AckNone (merged) messages: accepted minus received at n2, unless counted.
	got := len(rec.got[subs[0].ID()]["dnone"])
	lost := int(directAccepted[2].Load()) - got
	t.Logf("dnone: accepted %d received at n2 %d, unaccounted at most %d", directAccepted[2].Load(), got, lost)
	if os.Getenv("CP_STRICT") != "" {
		assert.LessOrEqual(t, uint64(lost), n0.Stats().Rejected-rej0+c.Nodes[1].Stats().AckNoneRefused-refused0, "AckNone messages lost without being counted")
	}
}
