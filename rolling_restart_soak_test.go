//go:build soak

package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// rollRec counts, per subscriber, the runs of each message and the order of
// each stream.
type rollRec struct {
	mu    sync.Mutex
	runs  map[pubsub.SubscriberID]map[string]int   // "stream-idx" -> runs
	order map[pubsub.SubscriberID]map[string][]int // stream -> indexes, as run
}

func (r *rollRec) handler(ctx context.Context, m *pubsub.Message) error {
	id, _ := pubsub.SubscriberFromContext(ctx)
	s := string(m.Data)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.runs[id] == nil {
		r.runs[id], r.order[id] = map[string]int{}, map[string][]int{}
	}
	r.runs[id][s]++
	if i := strings.LastIndexByte(s, '-'); i > 0 {
		if idx, err := strconv.Atoi(s[i+1:]); err == nil {
			r.order[id][s[:i]] = append(r.order[id][s[:i]], idx)
		}
	}
	return nil
}

func (r *rollRec) ran(id pubsub.SubscriberID, m string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.runs[id][m]
}

func (r *rollRec) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.runs {
		for _, c := range m {
			n += c
		}
	}
	return n
}

// TestSoakRollingServerRestart restarts the three NATS servers one after
// the other, twice (first by shutdown, then by lame duck mode), as an
// operator's rolling upgrade does, under nodes that keep publishing to
// three topics (each with a broadcast subscriber on every node and a
// consumer group of three) through AckDelivered and AckAccepted producers
// and an AckNone publish loop, each on another node. Afterwards every topic
// serves again, every future completed, acks claim only subscribers that ran
// the message, order holds per producer at broadcast subscribers, views
// converge, no node stopped and no NATS subscription leaked.
//
// Measured (-race, 2 cores, 4 runs): each restart step 30-40 ms by
// shutdown, 500-710 ms in lame duck mode (1 s duration); every topic
// served all four from every node 10-56 ms after the last step. A batch
// in flight when its connection went away is the cost: AckDelivered acks
// list the node it missed as a timeout (3.5 s), AckAccepted producers
// wait SubscriberTimeout + RequestTimeout (5 s) for two batches each and
// report them ErrTimeout. Run it with
//
//	go test -race -tags soak -run TestSoakRollingServerRestart -v .
func TestSoakRollingServerRestart(t *testing.T) {
	ldm := func(o *server.Options) {
		o.LameDuckDuration = time.Second
		o.LameDuckGracePeriod = 200 * time.Millisecond
	}
	c := newCluster(t, 3, 3)
	stopped := make(chan pubsub.NodeStopped, 16)
	for _, n := range c.Nodes {
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			switch e := e.(type) {
			case pubsub.NodeStopped:
				stopped <- e
			case pubsub.MemberLeft:
				t.Logf("membership flapped: %+v", e)
			}
		})
		t.Cleanup(cancel)
	}
	rec := &rollRec{runs: map[pubsub.SubscriberID]map[string]int{}, order: map[pubsub.SubscriberID]map[string][]int{}}
	var topics []string
	subs := map[string][]*pubsub.Subscription{} // topic -> 3 broadcast, then 3 group members
	for k, n := range c.Nodes {
		topic := ownedBy(t, n, "roll"+strconv.Itoa(k))
		topics = append(topics, topic)
		for _, m := range c.Nodes {
			subs[topic] = append(subs[topic], subscribe(t, m, topic, rec.handler))
		}
		for _, m := range c.Nodes {
			s, err := m.Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
			require.NoError(t, err)
			subs[topic] = append(subs[topic], s)
		}
		publishUntilAccepted(t, c.Nodes[0], topic, []byte("warm-0"), 4, 10*time.Second)
	}
	natsSubs := make([]int, len(c.Conns))
	for i, nc := range c.Conns {
		natsSubs[i] = nc.NumSubscriptions()
	}

	type sent struct {
		f      *pubsub.Produced
		stream string
		idx    int
	}
	var mu sync.Mutex
	var futs []sent
	noneSent := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var prods []*pubsub.BatchingProducer
	for k, topic := range topics {
		for j, l := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
			p, err := pubsub.NewBatchingProducer(c.Nodes[(k+j)%3], topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 20})
			require.NoError(t, err)
			prods = append(prods, p)
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				_ = p.Close(ctx)
			})
			stream := fmt.Sprintf("t%d%s", k, l)
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					f := p.Produce(context.Background(), []byte(fmt.Sprintf("%s-%d", stream, i)))
					mu.Lock()
					futs = append(futs, sent{f, stream, i})
					mu.Unlock()
					if i%40 == 39 {
						w := time.Now()
						ack, err := f.Wait(context.Background()) // a window, not synchronisation
						if d := time.Since(w); d > 500*time.Millisecond {
							t.Logf("%s-%d: window waited %v: %+v %v", stream, i, d, ack, err)
						}
					}
				}
			})
		}
		n := c.Nodes[(k+2)%3]
		stream := fmt.Sprintf("t%dnone", k)
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond): // pace the loop
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := n.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte(fmt.Sprintf("%s-%d", stream, i))}}, pubsub.WithAck(pubsub.AckNone))
				cancel()
				if err == nil {
					mu.Lock()
					noneSent[stream]++
					mu.Unlock()
				}
			}
		})
	}

	progress := func() { // some traffic reaches subscribers
		t.Helper()
		mark := rec.total()
		testcluster.WaitFor(t, 20*time.Second, func() bool { return rec.total() > mark+3000 }, "no traffic")
	}
	progress()
	rollStart := time.Now()
	for _, lameDuck := range []bool{false, true} {
		for i := range c.Servers.Servers {
			stepStart := time.Now()
			var stopFn func(*server.Server)
			if lameDuck {
				stopFn = (*server.Server).LameDuckShutdown
			}
			c.RestartServer(t, i, stopFn, ldm)
			testcluster.WaitFor(t, 10*time.Second, func() bool {
				for _, nc := range c.Conns {
					if !nc.IsConnected() {
						return false
					}
				}
				return true
			}, "nodes not connected after restarting server %d", i)
			t.Logf("lame duck %v: server %d restarted, routed and nodes connected in %v", lameDuck, i, time.Since(stepStart))
		}
	}
	rollEnd := time.Now()
	t.Logf("roll took %v", rollEnd.Sub(rollStart))
	// Every topic serves again, from every node, within a bound: a publish
	// reaching all four (3 broadcast subscribers and the group), with the
	// producers still running.
	for _, topic := range topics {
		for _, n := range c.Nodes {
			publishUntilAccepted(t, n, topic, []byte("recovered-"+n.ID()), 4, 10*time.Second)
		}
		t.Logf("%s serves all 4 from every node %v after the roll", topic, time.Since(rollEnd))
	}
	progress()
	close(stop)
	wg.Wait()
	// A fence reaching all four, after every producer's last message.
	for _, topic := range topics {
		publishUntilAccepted(t, c.Nodes[1], topic, []byte("fence-0"), 4, 10*time.Second)
	}
	for _, p := range prods {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		assert.NoError(t, p.Flush(ctx))
		cancel()
	}
	// Quiesce: AckAccepted and AckNone batches may still be on their way.
	last, since := rec.total(), time.Now()
	testcluster.WaitFor(t, 30*time.Second, func() bool {
		if n := rec.total(); n != last {
			last, since = n, time.Now()
		}
		return time.Since(since) > time.Second
	}, "deliveries did not quiesce")

	outcome := map[string]int{}
	for _, s := range futs {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		ack, err := s.f.Wait(ctx)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s-%d: future not completed", s.stream, s.idx)
			continue
		}
		if err != nil {
			outcome[s.stream+" "+ack.Reason.String()]++
			assert.ErrorIs(t, err, ack.Reason.Err())
			continue
		}
		outcome[s.stream+" ok"]++
		m := fmt.Sprintf("%s-%d", s.stream, s.idx)
		topic := topics[s.stream[1]-'0']
		if ack.Level != pubsub.AckDelivered {
			if ack.Delivered != 0 || len(ack.Failures) != 0 {
				t.Errorf("%s: %v ack %+v claims deliveries", m, ack.Level, ack)
			}
			continue
		}
		failed := map[pubsub.SubscriberID]bool{}
		groupFailed := false
		for _, f := range ack.Failures {
			failed[f.Subscriber] = true
			if f.Group != "" {
				groupFailed = true
			}
		}
		ran, groupRan := 0, 0
		for k, sb := range subs[topic] {
			r := rec.ran(sb.ID(), m)
			if k < 3 {
				if r > 0 {
					ran++
				} else if !failed[sb.ID()] {
					t.Errorf("%s: ack %+v counts broadcast %s delivered, its handler never ran it", m, ack, sb.ID())
				}
			} else {
				groupRan += r
			}
		}
		if groupRan == 0 && !groupFailed {
			t.Errorf("%s: ack %+v counts group g delivered, no member ran it", m, ack)
		}
		if groupRan > 0 {
			ran++
		}
		if ack.Delivered > ran {
			t.Errorf("%s: ack Delivered %d, only %d ran it", m, ack.Delivered, ran)
		}
	}
	t.Logf("futures: %v; AckNone accepted: %v", outcome, noneSent)

	rec.mu.Lock()
	for _, topic := range topics {
		for _, sb := range subs[topic][:3] {
			for stream, idx := range rec.order[sb.ID()] {
				for k := 1; k < len(idx); k++ {
					if idx[k] <= idx[k-1] {
						t.Errorf("%s %s: %d after %d (duplicate or out of order)", sb.ID(), stream, idx[k], idx[k-1])
						break
					}
				}
			}
		}
	}
	rec.mu.Unlock()

	// Every live subscription receives (or ended saying why).
	for _, topic := range topics {
		for k, sb := range subs[topic] {
			select {
			case <-sb.Done():
				t.Errorf("%s ended: %v", sb.ID(), sb.Err())
				continue
			default:
			}
			if k < 3 && rec.ran(sb.ID(), "fence-0") != 1 {
				t.Errorf("%s ran the fence %d times", sb.ID(), rec.ran(sb.ID(), "fence-0"))
			}
		}
		for i := 0; ; i++ {
			m := fmt.Sprintf("after-%d", i)
			ack, err := c.Nodes[2].Publish(ctxT(t), topic, []byte(m))
			require.NoError(t, err)
			require.Equal(t, 4, ack.Delivered, "%+v", ack)
			all := true
			for _, sb := range subs[topic][3:] {
				got := 0
				for j := 0; j <= i; j++ {
					got += rec.ran(sb.ID(), fmt.Sprintf("after-%d", j))
				}
				all = all && got > 0
			}
			if all {
				break
			}
			require.Less(t, i, 30, "a group member of %s received none of 30 messages", topic)
		}
	}

	c.WaitConverged(t, 10*time.Second)
	for _, topic := range topics {
		o0, err := c.Nodes[0].OwnerOf(topic)
		require.NoError(t, err)
		for _, n := range c.Nodes[1:] {
			o, err := n.OwnerOf(topic)
			require.NoError(t, err)
			assert.Equal(t, o0.ID, o.ID, "owner of %s", topic)
		}
	}
	select {
	case s := <-stopped:
		t.Errorf("node stopped: %+v", s)
	default:
	}
	for i, nc := range c.Conns {
		assert.Equal(t, natsSubs[i], nc.NumSubscriptions(), "NATS subscriptions of n%d before and after the roll", i)
	}
	for i, n := range c.Nodes {
		t.Logf("n%d stats %+v", i, n.Stats())
	}
}
