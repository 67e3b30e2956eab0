//go:build scale

package pubsub_test

// TestMembershipScale measures membership at fleet sizes in one process on a
// 3-server cluster with default timings: a concurrent join of every node,
// idle CPU, then a rolling restart of every node (graceful Close, Join with
// the same ID) while 50 publishers send 2 000 messages/s to 2 000 topics
// with 2 subscribers each on two nodes that stay up. It prints one table row
// per size:
//
//	go test -tags scale -run MembershipScale -v -timeout 60m .        (PUBSUB_SCALE_N=12,48,96)
//
// It checks that no accepted message silently missed a subscriber, and
// reports everything else (OutOfOrder drops, latency, CPU, handoff requests).

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

func TestMembershipScale(t *testing.T) {
	sizes := []int{12, 48, 96}
	if s := os.Getenv("PUBSUB_SCALE_N"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				t.Fatalf("PUBSUB_SCALE_N: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	var rows []string
	for _, n := range sizes {
		t.Run(strconv.Itoa(n), func(t *testing.T) { rows = append(rows, runMembershipScale(t, n)) })
	}
	t.Logf("\n| nodes | concurrent join | idle CPU | restart step p50 / max | publish p50 / p99 | CPU during restart | handoff requests | OutOfOrder | silently missed |\n|---|---|---|---|---|---|---|---|---|\n%s", strings.Join(rows, "\n"))
}

// cpuTime is the process's user + system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type scaleFleet struct {
	t     *testing.T
	c     *testcluster.Cluster
	mu    sync.Mutex
	nodes []*pubsub.Node // by index; nil while restarting
	conns []*nats.Conn
	done  atomic.Uint64 // handoff requests answered by nodes already closed
	drops warnCounter   // "join replies dropped" warnings of every node
}

// warnCounter is a slog handler counting the records whose message holds
// a substring.
type warnCounter struct {
	match string
	n     atomic.Int64
}

// Enabled asks for warnings only: the nodes then build no debug records,
// which would count in the CPU figures the scale test reports.
func (w *warnCounter) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnCounter) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, w.match) {
		w.n.Add(1)
	}
	return nil
}
func (w *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnCounter) WithGroup(string) slog.Handler      { return w }

func (f *scaleFleet) join(i int) (*pubsub.Node, error) {
	nc, err := nats.Connect(f.c.Servers.URL(i%len(f.c.Servers.Servers)), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := pubsub.Join(ctx, nc, pubsub.WithNodeID(fmt.Sprintf("s%03d", i)), pubsub.WithMetricsInterval(0),
		pubsub.WithLogger(slog.New(&f.drops)))
	if err != nil {
		nc.Close()
		return nil, err
	}
	f.mu.Lock()
	f.nodes[i], f.conns[i] = n, nc
	f.mu.Unlock()
	return n, nil
}

func (f *scaleFleet) close(i int) {
	f.mu.Lock()
	n, nc := f.nodes[i], f.conns[i]
	f.nodes[i] = nil
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		f.t.Errorf("close %s: %v", n.ID(), err)
	}
	f.done.Add(n.Stats().SyncRequests) // after Close: handovers are served while it drains
	nc.Close()
}

func (f *scaleFleet) syncRequests() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	total := f.done.Load()
	for _, n := range f.nodes {
		if n != nil {
			total += n.Stats().SyncRequests
		}
	}
	return total
}

func (f *scaleFleet) converged(want int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, n := range f.nodes {
		if n == nil || len(n.Members()) != want {
			return false
		}
	}
	return true
}

func runMembershipScale(t *testing.T, size int) string {
	c := testcluster.New(t, 3, 0)
	f := &scaleFleet{t: t, c: c, nodes: make([]*pubsub.Node, size), conns: make([]*nats.Conn, size), drops: warnCounter{match: "join replies dropped"}}
	t.Cleanup(func() {
		for i := range f.nodes {
			if f.nodes[i] != nil {
				f.close(i)
			}
		}
	})

	// Every node joins at once.
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, size)
	for i := range size {
		wg.Go(func() {
			if _, err := f.join(i); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	joinsReturned := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	testcluster.WaitFor(t, 60*time.Second, func() bool { return f.converged(size) }, "views of %d nodes never converged", size)
	joinTime := time.Since(start)
	t.Logf("%d concurrent joins returned in %v; every view holds all %d members after %v; %d joins dropped replies", size, joinsReturned, size, joinTime, f.drops.n.Load())
	if d := f.drops.n.Load(); d > 0 {
		t.Errorf("%d joins dropped replies as a slow consumer", d)
	}

	// Idle CPU, once settled.
	time.Sleep(2 * time.Second) // settling is the point: heartbeats only
	cpu0, wall0 := cpuTime(), time.Now()
	time.Sleep(5 * time.Second) // the measurement window
	idle := float64(cpuTime()-cpu0) / float64(time.Since(wall0)) * 100

	// 2 000 topics, subscribed on the two nodes that stay up.
	const topics = 2000
	rec := newRecorder()
	names := make([]string, topics)
	subs := map[string][]pubsub.SubscriberID{}
	for i := range names {
		names[i] = fmt.Sprintf("scale-%d", i)
		for _, n := range f.nodes[:2] {
			s, err := n.Subscribe(context.Background(), names[i], rec.handler)
			if err != nil {
				t.Fatal(err)
			}
			subs[names[i]] = append(subs[names[i]], s.ID())
		}
	}

	// 50 pipelined BatchingProducers (MaxInFlight 4), 40 messages/s each,
	// on the two stable nodes; the latency is from Produce to the future.
	type sent struct {
		topic, data string
		ack         pubsub.PublishAck
	}
	var mu sync.Mutex
	var accepted []sent
	var latencies []time.Duration
	var outOfOrder, rejected atomic.Int64
	stop := make(chan struct{})
	var pubs sync.WaitGroup
	for p := range 50 {
		topic := names[(p*7919)%topics]
		prod, err := pubsub.NewBatchingProducer(f.nodes[p%2], topic, pubsub.ProducerConfig{MaxInFlight: 4,
			OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue }})
		if err != nil {
			t.Fatal(err)
		}
		pubs.Go(func() {
			defer func() { _ = prod.Close(context.Background()) }()
			tick := time.NewTicker(25 * time.Millisecond)
			defer tick.Stop()
			var inflight sync.WaitGroup
			defer inflight.Wait()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				data := fmt.Sprintf("p%d-%d", p, k)
				t0 := time.Now()
				fut := prod.Produce(context.Background(), []byte(data))
				inflight.Go(func() {
					ack, err := fut.Wait(context.Background())
					d := time.Since(t0)
					mu.Lock()
					defer mu.Unlock()
					latencies = append(latencies, d)
					if err != nil {
						rejected.Add(1)
						return
					}
					accepted = append(accepted, sent{topic, data, ack})
					for _, fl := range ack.Failures {
						if fl.Status == pubsub.OutOfOrder {
							outOfOrder.Add(1)
						}
					}
				})
			}
		})
	}

	// Rolling restart of every node but the two stable ones.
	sync0 := f.syncRequests()
	cpu1, wall1 := cpuTime(), time.Now()
	var steps, closes []time.Duration
	for i := 2; i < size; i++ {
		s0 := time.Now()
		f.close(i)
		closes = append(closes, time.Since(s0))
		if _, err := f.join(i); err != nil {
			t.Fatal(err)
		}
		steps = append(steps, time.Since(s0))
	}
	testcluster.WaitFor(t, 60*time.Second, func() bool { return f.converged(size) }, "views never converged after the restart")
	restartCPU := float64(cpuTime()-cpu1) / float64(time.Since(wall1)) * 100
	handoff := f.syncRequests() - sync0
	close(stop)
	pubs.Wait()

	// Silent misses: an accepted message a stable subscriber neither got
	// nor was reported for.
	got := map[pubsub.SubscriberID]map[string]bool{}
	for _, ids := range subs {
		for _, id := range ids {
			got[id] = map[string]bool{}
			for _, d := range rec.of(id) {
				got[id][d] = true
			}
		}
	}
	missing := 0
	for _, s := range accepted {
		for _, id := range subs[s.topic] {
			if got[id][s.data] {
				continue
			}
			if _, reported := failureOf(s.ack, id); !reported {
				missing++
			}
		}
	}
	if missing > 0 {
		t.Errorf("%d accepted messages silently missed a subscriber", missing)
	}
	slices.Sort(latencies)
	slices.Sort(steps)
	slices.Sort(closes)
	t.Logf("restart steps: Close p50 %v max %v; whole step p50 %v max %v", closes[len(closes)/2], closes[len(closes)-1], steps[len(steps)/2], steps[len(steps)-1])
	pct := func(d []time.Duration, p float64) time.Duration {
		if len(d) == 0 {
			return 0
		}
		return d[int(float64(len(d)-1)*p)]
	}
	return fmt.Sprintf("| %d | %v | %.0f%% | %v / %v | %v / %v | %.0f%% | %d | %d | %d |", size,
		joinTime.Round(time.Millisecond), idle, pct(steps, 0.5).Round(time.Millisecond), pct(steps, 1).Round(time.Millisecond),
		pct(latencies, 0.5).Round(100*time.Microsecond), pct(latencies, 0.99).Round(time.Millisecond), restartCPU, handoff, outOfOrder.Load(), missing)
}

// TestNoGhostRejoin closes and rejoins a node 500 times beside two others
// with default timings, and counts the closed incarnations that any peer
// re-added after their LEAVE (a heartbeat racing the leave, or arriving
// late).
//
//	go test -tags scale -run NoGhostRejoin -v .
func TestNoGhostRejoin(t *testing.T) {
	const closes = 500
	c := testcluster.New(t, 3, 2, pubsub.WithMetricsInterval(0))
	c.WaitConverged(t, 10*time.Second)
	// A ghost is an incarnation a peer adds twice: joined, left, re-added.
	var mu sync.Mutex
	joins := map[string]int{} // peer/incarnation -> MemberJoined events
	for _, n := range c.Nodes {
		cancel := n.Events().Subscribe(func(e pubsub.Event) {
			if j, ok := e.(pubsub.MemberJoined); ok && j.Member.ID == "closer" {
				mu.Lock()
				joins[fmt.Sprintf("%s/%d", j.Node, j.Member.Incarnation)]++
				mu.Unlock()
			}
		})
		defer cancel()
	}
	for range closes {
		nc, err := nats.Connect(c.Servers.URL(0))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		n, err := pubsub.Join(ctx, nc, pubsub.WithNodeID("closer"), pubsub.WithMetricsInterval(0))
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		if err := n.Close(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		nc.Close()
	}
	c.WaitConverged(t, 10*time.Second)
	mu.Lock()
	ghosts := 0
	for _, k := range joins {
		if k > 1 {
			ghosts++
		}
	}
	mu.Unlock()
	t.Logf("%d closes, %d ghost rejoins", closes, ghosts)
	if ghosts > 0 {
		t.Errorf("%d closed incarnations re-added after their leave", ghosts)
	}
}

// TestConcurrentJoin joins N nodes at once (PUBSUB_SCALE_N, default 96) and
// reports when every Join returned and when every view held all N.
//
//	go test -tags scale -run ConcurrentJoin -v .
func TestConcurrentJoin(t *testing.T) {
	size := 96
	if s := os.Getenv("PUBSUB_SCALE_N"); s != "" {
		size, _ = strconv.Atoi(s)
	}
	c := testcluster.New(t, 3, 0)
	f := &scaleFleet{t: t, c: c, nodes: make([]*pubsub.Node, size), conns: make([]*nats.Conn, size), drops: warnCounter{match: "join replies dropped"}}
	t.Cleanup(func() {
		var closing sync.WaitGroup
		for i := range f.nodes {
			if f.nodes[i] != nil {
				closing.Go(func() { f.close(i) })
			}
		}
		closing.Wait()
	})
	if path := os.Getenv("PUBSUB_JOIN_PROFILE"); path != "" {
		out, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		if err := pprof.StartCPUProfile(out); err != nil {
			t.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	cpu0 := cpuTime()
	start := time.Now()
	var wg sync.WaitGroup
	for i := range size {
		wg.Go(func() {
			if _, err := f.join(i); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	returned := time.Since(start)
	testcluster.WaitFor(t, 60*time.Second, func() bool { return f.converged(size) }, "views of %d nodes never converged", size)
	t.Logf("%d concurrent joins returned in %v; every view holds all %d members after %v; CPU %v; %d joins dropped replies", size, returned, size, time.Since(start), cpuTime()-cpu0, f.drops.n.Load())
	pprof.StopCPUProfile()
}
