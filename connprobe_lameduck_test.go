//go:build connprobe

package pubsub_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// Probe: the server under the owner and a subscriber goes into lame-duck
// mode while a producer streams; its clients move to the other server.
func TestProbeLameDuckServerUnderNodes(t *testing.T) {
	a, err := embedded.StartServerWith(func(o *server.Options) {
		o.ServerName = "A"
		o.Cluster = server.ClusterOpts{Name: "ld", Host: "127.0.0.1", Port: server.RANDOM_PORT, PoolSize: -1}
	})
	require.NoError(t, err)
	t.Cleanup(func() { a.Shutdown(); a.WaitForShutdown() })
	b, err := embedded.StartServerWith(func(o *server.Options) {
		o.ServerName = "B"
		o.Cluster = server.ClusterOpts{Name: "ld", Host: "127.0.0.1", Port: server.RANDOM_PORT, PoolSize: -1}
		o.Routes = server.RoutesFromStr("nats://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(a.ClusterAddr().Port)))
		o.LameDuckDuration = 1500 * time.Millisecond
		o.LameDuckGracePeriod = 200 * time.Millisecond
	})
	require.NoError(t, err)
	t.Cleanup(func() { b.Shutdown(); b.WaitForShutdown() })
	testcluster.WaitFor(t, 10*time.Second, func() bool { return a.NumRoutes() == 1 && b.NumRoutes() == 1 }, "routes")

	var nodes []*pubsub.Node
	var conns []*nats.Conn
	for i, first := range []*server.Server{a, b, b} {
		other := a
		if first == a {
			other = b
		}
		nc, err := nats.Connect(first.ClientURL()+","+other.ClientURL(), nats.DontRandomize(), nats.MaxReconnects(-1),
			nats.ReconnectWait(50*time.Millisecond), nats.NoCallbacksAfterClientClose())
		require.NoError(t, err)
		t.Cleanup(nc.Close)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		n, err := pubsub.Join(ctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID(fmt.Sprintf("n%d", i)))...)
		cancel()
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = n.Close(ctx)
		})
		nodes, conns = append(nodes, n), append(conns, nc)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		for _, n := range nodes {
			if len(n.Members()) != 3 {
				return false
			}
		}
		return true
	}, "views")
	topic := ownedBy(t, nodes[1], "ld")
	rec := &cpOrder{got: map[pubsub.SubscriberID]map[string][]int{}}
	subs := []*pubsub.Subscription{subscribe(t, nodes[0], topic, rec.handler), subscribe(t, nodes[2], topic, rec.handler)}
	left := make(chan pubsub.MemberLeft, 16)
	cancelEv := nodes[0].Events().Subscribe(func(e pubsub.Event) {
		if l, ok := e.(pubsub.MemberLeft); ok {
			select {
			case left <- l:
			default:
			}
		}
	})
	defer cancelEv()

	results := map[pubsub.AckLevel][]*pubsub.Produced{}
	var resMu sync.Mutex
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for _, l := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
		p, err := pubsub.NewBatchingProducer(nodes[0], topic, pubsub.ProducerConfig{AckLevel: l, BatchSize: 20})
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = p.Close(ctx)
		})
		var fs []*pubsub.Produced
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					resMu.Lock()
					results[l] = fs
					resMu.Unlock()
					return
				default:
				}
				f := p.Produce(context.Background(), []byte(fmt.Sprintf("p%s-%d", l, i)))
				fs = append(fs, f)
				if i%40 == 39 {
					_, _ = f.Wait(context.Background())
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond) // probe: some traffic before
	ldDone := make(chan struct{})
	go func() { b.LameDuckShutdown(); close(ldDone) }()
	select {
	case <-ldDone:
	case <-time.After(20 * time.Second):
		t.Fatal("lame duck did not finish")
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		return conns[1].IsConnected() && conns[2].IsConnected() && conns[1].ConnectedUrl() == a.ClientURL() && conns[2].ConnectedUrl() == a.ClientURL()
	}, "nodes did not move to A")
	time.Sleep(300 * time.Millisecond) // probe: some traffic after
	close(stop)
	wg.Wait()
	pubAfter := publishUntilAccepted(t, nodes[0], topic, []byte("fence-0"), 2, 10*time.Second)
	_ = pubAfter
	for l, fs := range results {
		out := map[string]int{}
		for i, f := range fs {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			ack, err := f.Wait(ctx)
			cancel()
			if err != nil {
				out[ack.Reason.String()]++
				continue
			}
			out["ok"]++
			if l == pubsub.AckDelivered {
				failed := map[pubsub.SubscriberID]bool{}
				for _, fl := range ack.Failures {
					failed[fl.Subscriber] = true
					out["fail:"+fl.Status.String()]++
				}
				for _, s := range subs {
					if !failed[s.ID()] && !rec.has(s.ID(), "p"+l.String(), i) {
						t.Errorf("%v #%d counted delivered to %s, never ran", l, i, s.ID())
					}
				}
			}
		}
		t.Logf("%v: %d futures %v", l, len(fs), out)
	}
	rec.mu.Lock()
	for _, s := range subs {
		for stream, idx := range rec.got[s.ID()] {
			for k := 1; k < len(idx); k++ {
				if idx[k] <= idx[k-1] {
					t.Errorf("%s %s: %d after %d", s.ID(), stream, idx[k], idx[k-1])
					break
				}
			}
			t.Logf("%s %s got %d", s.ID(), stream, len(idx))
		}
	}
	rec.mu.Unlock()
	select {
	case l := <-left:
		t.Logf("membership flapped: %+v", l)
	default:
	}
}
