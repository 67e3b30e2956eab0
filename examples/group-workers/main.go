// Command group-workers shows consumer groups: three workers, one per node,
// share the jobs of one topic as members of the group "workers", while an
// auditor outside the group sees every job.
//
//	go run ./examples/group-workers                                # 3 embedded NATS servers
//	go run ./examples/group-workers -url nats://localhost:4222     # an existing NATS
//
// Each of the three nodes subscribes one worker to "jobs" with
// pubsub.WithGroup("workers"); node-a also subscribes an auditor without a
// group. A BatchingProducer on node-c produces 300 jobs, each keyed by one
// of ten customers. Every job then reaches exactly one worker, and all the
// jobs of one customer reach the same worker, in the order they were
// produced; the auditor gets all of them. In each PublishAck the group
// counts once, so every job is delivered to 2 subscribers.
//
// It exits 0 when every job ran on exactly one worker, each customer's jobs
// on one worker in produced order, and the auditor saw all of them; 1
// otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

const (
	topic     = "jobs"
	group     = "workers"
	jobs      = 300
	customers = 10
)

// job is one job as a handler saw it.
type job struct {
	n   int    // the job's number, from its data "job-<n>"
	key string // its customer
}

// journal records the jobs one subscriber handled, in handling order.
type journal struct {
	mu   sync.Mutex
	jobs []job
}

// handler returns a pubsub.Handler that appends each job to j. It runs on
// the subscription's own goroutine, one job at a time.
func (j *journal) handler(name string) pubsub.Handler {
	return func(ctx context.Context, m *pubsub.Message) error {
		n, err := strconv.Atoi(strings.TrimPrefix(string(m.Data), "job-"))
		if err != nil {
			return fmt.Errorf("%s: bad job %q: %w", name, m.Data, err)
		}
		j.mu.Lock()
		// m.Key refers to the batch's buffer: clone what is kept.
		j.jobs = append(j.jobs, job{n: n, key: strings.Clone(m.Key)})
		j.mu.Unlock()
		return nil
	}
}

func (j *journal) len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.jobs)
}

func (j *journal) snapshot() []job {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.jobs)
}

// worker is one member of the group.
type worker struct {
	node    string
	sub     *pubsub.Subscription
	journal journal
}

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "comma-separated NATS URLs to use instead of 3 embedded servers")
	prefix := flag.String("prefix", "group-workers", "subject prefix, so the demo does not clash with other apps")
	flag.Parse()

	// Ctrl-C cancels ctx, and so does the overall deadline: every call below
	// then returns, and the deferred cleanups still run (producer, nodes,
	// connections, servers, in that order).
	sigctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(sigctx, 60*time.Second)
	defer cancel()
	fail := func(format string, args ...any) int {
		if ctx.Err() != nil {
			format = "interrupted or timed out: " + format
		}
		fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
		return 1
	}

	// 1. NATS: three routed embedded servers, or the URLs given with -url.
	ids := []string{"node-a", "node-b", "node-c"}
	var urls []string
	if *url == "" {
		servers, err := embedded.StartCluster(3)
		if err != nil {
			return fail("start embedded NATS: %v", err)
		}
		defer servers.Shutdown()
		urls = servers.URLs()
		fmt.Printf("nats    3 embedded servers: %s\n", strings.Join(urls, " "))
	} else {
		urls = strings.FieldsFunc(*url, func(r rune) bool { return r == ',' || r == ' ' })
		fmt.Printf("nats    existing: %s (prefix %q)\n", *url, *prefix)
	}

	// 2. One connection per node, "its" server first, and Join. Connections
	// are closed after all nodes.
	var conns []*nats.Conn
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	var nodes []*pubsub.Node
	defer func() {
		for _, n := range slices.Backward(nodes) {
			closeNode(n)
		}
	}()
	for i, id := range ids {
		own := urls[i%len(urls)]
		list := append([]string{own}, slices.DeleteFunc(slices.Clone(urls), func(u string) bool { return u == own })...)
		nc, err := nats.Connect(strings.Join(list, ","), nats.Name(id), nats.DontRandomize())
		if err != nil {
			return fail("connect %s to %s: %v", id, own, err)
		}
		conns = append(conns, nc)
		jctx, jcancel := context.WithTimeout(ctx, 10*time.Second)
		node, err := pubsub.Join(jctx, nc, pubsub.WithPrefix(*prefix), pubsub.WithNodeID(id))
		jcancel()
		if err != nil {
			return fail("join %s: %v", id, err)
		}
		nodes = append(nodes, node)
		fmt.Printf("join    %-7s via %s\n", id, own)
	}

	// 3. Wait until every node sees all of ours (others may share -url), so
	// that they agree on the owner of "jobs".
	converged := func() bool {
		for _, n := range nodes {
			ours := slices.DeleteFunc(n.Members(), func(m pubsub.Member) bool { return !slices.Contains(ids, m.ID) })
			if len(ours) != len(ids) {
				return false
			}
		}
		return true
	}
	if !waitFor(ctx, 10*time.Second, converged) {
		return fail("members did not converge to %v within 10s", ids)
	}
	if owner, err := nodes[0].OwnerOf(topic); err == nil {
		fmt.Printf("owner   %s -> %s\n", topic, owner.ID)
	}

	// 4. The group: one worker per node, each a member of "workers". The
	// owner routes every job to one member; a keyed job to the member its
	// key hashes to while the group is unchanged. Subscribe returns once the
	// owner recorded the member: nothing produced below misses it.
	workers := make([]*worker, len(nodes))
	for i, n := range nodes {
		w := &worker{node: n.ID()}
		sub, err := n.Subscribe(ctx, topic, w.journal.handler("worker on "+n.ID()), pubsub.WithGroup(group))
		if err != nil {
			return fail("subscribe worker on %s: %v", n.ID(), err)
		}
		w.sub = sub
		workers[i] = w
		fmt.Printf("sub     worker  %-24s group=%s\n", sub.ID(), sub.Group())
	}

	// 5. The auditor: no group, so it gets every job.
	var audit journal
	auditor, err := nodes[0].Subscribe(ctx, topic, audit.handler("auditor"))
	if err != nil {
		return fail("subscribe auditor on %s: %v", nodes[0].ID(), err)
	}
	fmt.Printf("sub     auditor %-24s group=%q\n", auditor.ID(), auditor.Group())

	// 6. The producer, on node-c, with up to 4 batches in flight (still
	// delivered in produce order).
	producer, err := pubsub.NewBatchingProducer(nodes[2], topic, pubsub.ProducerConfig{})
	if err != nil {
		return fail("producer: %v", err)
	}
	defer func() { // runs first: the producer publishes what it holds while the nodes are up
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer ccancel()
		if err := producer.Close(cctx); err != nil {
			fmt.Fprintf(os.Stderr, "close producer: %v\n", err)
		}
	}()

	// 7. Produce the jobs, each keyed by its customer, then wait on every
	// future. Each ack must count 2 deliveries: the auditor and the group,
	// which counts once whichever worker ran the job.
	var problems []string
	problem := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	keyOf := func(n int) string { return fmt.Sprintf("customer-%d", n%customers) }
	futures := make([]*pubsub.Produced, jobs)
	for n := range futures {
		futures[n] = producer.ProduceMessage(ctx, pubsub.Outgoing{Data: []byte(fmt.Sprintf("job-%d", n)), Key: keyOf(n)})
	}
	fmt.Printf("send    %d jobs for %d customers from %s\n", jobs, customers, nodes[2].ID())
	accepted := 0
	for n, f := range futures { // futures complete in produce order
		ack, err := f.Wait(ctx)
		switch {
		case err != nil: // err != nil exactly when ack.Status == Rejected
			problem("job-%d: %s reason=%s: %v", n, ack.Status, ack.Reason, err)
		case ack.Delivered != 2 || len(ack.Failures) > 0:
			problem("job-%d: delivered=%d failures=%v, want delivered=2 and no failure", n, ack.Delivered, ack.Failures)
		default:
			accepted++
		}
	}
	fmt.Printf("ack     %d of %d jobs accepted with delivered=2 failures=0\n", accepted, jobs)

	// 8. Verify. An accepted ack means the handlers already ran; the poll
	// only bounds the wait should one be missing.
	allIn := func() bool {
		total := 0
		for _, w := range workers {
			total += w.journal.len()
		}
		return total >= jobs && audit.len() >= jobs
	}
	waitFor(ctx, 5*time.Second, allIn)

	ran := make(map[int][]string)       // job -> the workers that ran it
	keyWorkers := map[string][]string{} // key -> the workers that got it
	for _, w := range workers {
		got := w.journal.snapshot()
		perKey := map[string][]int{} // key -> jobs in handling order
		for _, j := range got {
			ran[j.n] = append(ran[j.n], w.node)
			if j.key != keyOf(j.n) {
				problem("job-%d reached the worker on %s with key %q, want %q", j.n, w.node, j.key, keyOf(j.n))
			}
			perKey[j.key] = append(perKey[j.key], j.n)
		}
		keys := slices.Sorted(maps.Keys(perKey))
		for _, k := range keys {
			keyWorkers[k] = append(keyWorkers[k], w.node)
			if !slices.IsSorted(perKey[k]) {
				problem("%s ran out of order on %s: %v", k, w.node, perKey[k])
			}
		}
		fmt.Printf("worker  %-7s %3d jobs, %2d customers %v\n", w.node, len(got), len(keys), keys)
	}
	for n := range jobs {
		if len(ran[n]) != 1 {
			problem("job-%d ran on %d workers %v, want exactly one", n, len(ran[n]), ran[n])
		}
	}
	for c := range customers {
		k := keyOf(c)
		if len(keyWorkers[k]) != 1 {
			problem("%s went to %d workers %v, want exactly one", k, len(keyWorkers[k]), keyWorkers[k])
		}
	}
	seen := audit.snapshot()
	order := make([]int, len(seen))
	for i, j := range seen {
		order[i] = j.n
	}
	fmt.Printf("auditor %-7s %3d jobs\n", nodes[0].ID(), len(seen))
	if want := sequence(jobs); !slices.Equal(order, want) {
		problem("the auditor saw %d jobs, want all %d in produced order", len(seen), jobs)
	}

	if len(problems) > 0 {
		const most = 10
		if len(problems) > most {
			problems = append(problems[:most], fmt.Sprintf("and %d more", len(problems)-most))
		}
		return fail("%s", strings.Join(problems, "; "))
	}
	fmt.Println("--- done: every job ran once, each customer on one worker, in order")
	return 0
}

// sequence returns 0, 1, ..., n-1.
func sequence(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

// closeNode leaves the cluster, giving the node 5s to stop.
func closeNode(n *pubsub.Node) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "close %s: %v\n", n.ID(), err)
	}
}

// waitFor polls cond every 10ms until it holds, the timeout passes or ctx ends.
func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	return true
}
