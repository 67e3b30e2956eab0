package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

const (
	// setupTimeout bounds each wait for a condition during setup: NATS
	// interest, a join, the nodes' views converging.
	setupTimeout = 10 * time.Second
	// closeTimeout bounds each Close of a producer or a node at the end of
	// a scenario, including after the run's own deadline passed.
	closeTimeout = 10 * time.Second
)

// nodeOptions are the options of every node bench starts, besides its ID
// and prefix: the in-repo benchmarks' timings (50 ms heartbeats).
var nodeOptions = []pubsub.Option{
	pubsub.WithHeartbeatInterval(50 * time.Millisecond),
	pubsub.WithMemberTimeout(2 * time.Second),
	pubsub.WithRequestTimeout(3 * time.Second),
	pubsub.WithSubscriberTimeout(2 * time.Second),
}

// bench is one run of the bench command.
type bench struct {
	cfg   *benchConfig
	urls  []string // one per server
	runID string   // makes node IDs, topics and raw subjects unique to this run
	prog  *progress
	// nodeLost holds the first disconnection of a node's connection in
	// the current scenario: the likely cause when the scenario then fails.
	nodeLost atomic.Pointer[error]
}

// slowConsumerHint says why a server closes a connection mid-run.
const slowConsumerHint = "a server closes a connection that falls max_pending bytes (64 MiB by default) behind as a slow consumer"

// report is everything a run measured: the JSON output.
type report struct {
	Servers    int              `json:"servers"`
	Embedded   bool             `json:"embedded"`
	SizeBytes  int              `json:"size_bytes"`
	Pattern    string           `json:"pattern"`
	NATSServer string           `json:"nats_server_version,omitempty"` // embedded servers only
	GOMAXPROCS int              `json:"gomaxprocs"`
	Seconds    float64          `json:"seconds"`
	Scenarios  []scenarioResult `json:"scenarios"`
}

// scenarioResult is what one scenario measured.
type scenarioResult struct {
	Name string `json:"name"`
	// Run numbers the runs of --repeat, from 1; 0 (left out) without it.
	Run int `json:"run,omitempty"`
	// Messages is the number of messages produced, or of publish calls
	// (latency) per ack level.
	Messages    int `json:"messages"`
	Nodes       int `json:"nodes"`
	Subscribers int `json:"subscribers"`
	// Raw is the raw NATS baseline; nil (null) when there is none.
	Raw     *measure `json:"raw"`
	Results []result `json:"results"`
}

// result is one pubsub measurement of a scenario and its ratio to the raw
// baseline.
type result struct {
	Pattern string  `json:"pattern"`
	PubSub  measure `json:"pubsub"`
	// Ratio is pubsub over raw NATS: a float64 for deliveries/s, a
	// *latency of per-percentile ratios for latencies, nil (null) without a
	// raw baseline.
	Ratio any    `json:"ratio"`
	Notes string `json:"notes,omitempty"`
}

// measure is one side's figures: a throughput or latencies.
type measure struct {
	Seconds          float64 `json:"seconds"`
	Deliveries       int64   `json:"deliveries,omitempty"`
	DeliveriesPerSec float64 `json:"deliveries_per_sec,omitempty"`
	// Accepted and QueueFullPct: Produce calls accepted, and the share
	// rejected with ErrQueueFull (burst pattern only).
	Accepted     int      `json:"accepted,omitempty"`
	QueueFullPct *float64 `json:"queue_full_pct,omitempty"`
	Latency      *latency `json:"latency_us,omitempty"`
}

// latency holds percentiles, in microseconds (or ratios).
type latency struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
}

// runBench runs the scenarios of cfg and prints their results to stdout.
func runBench(ctx context.Context, cfg *benchConfig, stdout, stderr io.Writer) (err error) {
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.timeout, fmt.Errorf("--timeout %v reached", cfg.timeout))
	defer cancel()
	prof, err := startProfiles(cfg)
	if err != nil {
		return err
	}
	defer func() {
		// A failed run's profiles are written too: they may show why.
		if perr := prof.stop(); perr != nil && err == nil {
			err = perr
		}
	}()
	start := time.Now()
	b := &bench{cfg: cfg, urls: cfg.urls, prog: newProgress(stderr), runID: newRunID()}
	rep := report{
		Servers:    len(cfg.urls),
		SizeBytes:  cfg.size,
		Pattern:    cfg.pattern(),
		GOMAXPROCS: runtime.GOMAXPROCS(0),
	}
	if len(b.urls) == 0 {
		sc, err := embedded.StartCluster(cfg.servers)
		if err != nil {
			return err
		}
		defer sc.Shutdown()
		b.urls = sc.URLs()
		rep.Servers, rep.Embedded, rep.NATSServer = cfg.servers, true, server.VERSION
	}

	for run := 1; run <= cfg.repeat; run++ {
		if run > 1 {
			// Names of its own: subscriptions of the run before, whose
			// connections are closed, may still be known over the routes.
			b.runID = newRunID()
		}
		for _, name := range cfg.scenarios {
			res, err := b.scenario(ctx, name)
			if err != nil {
				if cfg.repeat > 1 {
					return fmt.Errorf("run %d: %w", run, err)
				}
				return err
			}
			if cfg.repeat > 1 {
				res.Run = run
			}
			rep.Scenarios = append(rep.Scenarios, res)
		}
	}
	rep.Seconds = time.Since(start).Seconds()

	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return printTable(stdout, &rep)
}

// scenario runs the scenario name once and names a likely cause of its
// failure.
func (b *bench) scenario(ctx context.Context, name string) (res scenarioResult, err error) {
	switch name {
	case scenarioFanout:
		res, err = b.fanout(ctx)
	case scenarioLocal:
		res, err = b.local(ctx)
	case scenarioLatency:
		res, err = b.latency(ctx)
	case scenarioGroup:
		res, err = b.group(ctx)
	}
	if lost := b.nodeLost.Swap(nil); err != nil && lost != nil {
		err = fmt.Errorf("%w; the likely cause: %w (%s: see the server's log)", err, *lost, slowConsumerHint)
	}
	switch cause := context.Cause(ctx); {
	case err == nil && cause != nil:
		err = cause
	case err != nil && cause != nil && !errors.Is(err, cause):
		err = fmt.Errorf("%w (%v)", err, cause)
	}
	if err != nil {
		return res, fmt.Errorf("%s: %w", name, err)
	}
	return res, nil
}

// newRunID returns 6 random hex digits.
func newRunID() string {
	var b [3]byte
	_, _ = rand.Read(b[:]) // never fails
	return hex.EncodeToString(b[:])
}

// server returns the index of the server that node or connection i uses.
func (b *bench) server(i int) int { return i % len(b.urls) }

// rawSubject returns the subject of a raw NATS scenario.
func (b *bench) rawSubject(scenario string) string {
	return b.cfg.prefix + ".raw." + scenario + "." + b.runID
}

// connect connects to server i, falling back on the others in order.
func (b *bench) connect(i int, name string, opts ...nats.Option) (*nats.Conn, error) {
	urls := append(slices.Clone(b.urls[i:]), b.urls[:i]...)
	nc, err := nats.Connect(strings.Join(urls, ","), append([]nats.Option{
		nats.Name("pubsub-bench-" + name),
		nats.DontRandomize(),
		nats.NoCallbacksAfterClientClose(),
	}, append(slices.Clone(b.cfg.auth), opts...)...)...)
	if err != nil {
		return nil, fmt.Errorf("connect %s to %s%s: %w", name, redactURLs(b.urls[i]), b.cfg.authNote, err)
	}
	return nc, nil
}

// cleanup runs functions in reverse order of their addition, as defer
// does, and returns their errors joined.
type cleanup struct {
	fns []func() error
}

func (c *cleanup) add(fn func() error) { c.fns = append(c.fns, fn) }

func (c *cleanup) run() error {
	var errs []error
	for _, fn := range slices.Backward(c.fns) {
		errs = append(errs, fn())
	}
	c.fns = nil
	return errors.Join(errs...)
}

// joinFailure reports the nodes whose Join failed (errs[i] is node i's):
// the first one's error and how many failed. Nodes fail alike (a NATS user
// without the rights, the --timeout reached while they join), and one line
// per node buried the reason under --nodes copies of it.
func joinFailure(errs []error) error {
	var first error
	failed := 0
	for _, err := range errs {
		if err != nil {
			failed++
			first = cmp.Or(first, err)
		}
	}
	if failed <= 1 {
		return first
	}
	return fmt.Errorf("%d of %d nodes could not join; the first: %w", failed, len(errs), first)
}

// cluster is the pubsub nodes of one scenario, each on its own connection.
type cluster struct {
	nodes []*pubsub.Node
	conns []*nats.Conn
}

// join starts n nodes, node i on server i % servers, with prefix --prefix,
// and waits until each sees all of them. The nodes and their connections
// are closed by cl.
func (b *bench) join(ctx context.Context, cl *cleanup, scenario string, n int) (*cluster, error) {
	c := &cluster{nodes: make([]*pubsub.Node, n), conns: make([]*nats.Conn, n)}
	cl.add(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i, node := range c.nodes {
			if node != nil {
				wg.Go(func() { errs[i] = node.Close(ctx) })
			}
		}
		wg.Wait()
		for _, nc := range c.conns {
			if nc != nil {
				nc.Close()
			}
		}
		return errors.Join(errs...)
	})
	for i := range n {
		id := "bench-" + b.runID + "-" + scenario + "-n" + strconv.Itoa(i)
		url := redactURLs(b.urls[b.server(i)])
		nc, err := b.connect(b.server(i), id, nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			lost := fmt.Errorf("node n%d was disconnected from %s (%v)", i, url, err)
			b.nodeLost.CompareAndSwap(nil, &lost)
		}))
		if err != nil {
			return nil, err
		}
		c.conns[i] = nc
	}
	jctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, nc := range c.conns {
		id := "bench-" + b.runID + "-" + scenario + "-n" + strconv.Itoa(i)
		opts := append(slices.Clip(nodeOptions), pubsub.WithNodeID(id), pubsub.WithPrefix(b.cfg.prefix))
		wg.Go(func() {
			node, err := pubsub.Join(jctx, nc, opts...)
			c.nodes[i], errs[i] = node, err
		})
	}
	wg.Wait()
	if err := joinFailure(errs); err != nil {
		return nil, err
	}
	converged := func() bool {
		for _, node := range c.nodes {
			ids := map[string]bool{}
			for _, m := range node.Members() {
				ids[m.ID] = true
			}
			for _, other := range c.nodes {
				if !ids[other.ID()] {
					return false
				}
			}
		}
		return true
	}
	if !poll(jctx, converged) {
		var views strings.Builder
		for _, node := range c.nodes {
			fmt.Fprintf(&views, "; %s sees %d members", node.ID(), len(node.Members()))
		}
		return nil, fmt.Errorf("the views of %d nodes did not converge within %v%s", n, setupTimeout, views.String())
	}
	return c, nil
}

// topicOwnedBy returns a topic, named after scenario, that node owner owns
// in the view of every node of c.
func (b *bench) topicOwnedBy(c *cluster, scenario string, owner int) (string, error) {
	want := c.nodes[owner].ID()
	for i := range 100_000 {
		topic := "bench-" + scenario + "-" + b.runID + "-" + strconv.Itoa(i)
		ok := true
		for _, node := range c.nodes {
			m, err := node.OwnerOf(topic)
			if err != nil {
				return "", err
			}
			if m.ID != want {
				ok = false
				break
			}
		}
		if ok {
			return topic, nil
		}
	}
	return "", fmt.Errorf("no topic owned by %s found", want)
}

// poll reports whether cond became true before ctx ended, checking it
// every millisecond.
func poll(ctx context.Context, cond func() bool) bool {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		select {
		case <-ctx.Done():
			return cond()
		case <-tick.C:
		}
	}
}

// printTable writes rep as an aligned table.
func printTable(w io.Writer, rep *report) error {
	where := fmt.Sprintf("%d embedded NATS servers (nats-server %s)", rep.Servers, rep.NATSServer)
	if !rep.Embedded {
		where = fmt.Sprintf("%d NATS server URLs", rep.Servers)
	}
	fmt.Fprintf(w, "pubsub bench: %s, %d-byte messages, %s pattern, GOMAXPROCS %d\n\n", where, rep.SizeBytes, rep.Pattern, rep.GOMAXPROCS)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	// A RUN column only with --repeat: one run reads as before.
	repeated := slices.ContainsFunc(rep.Scenarios, func(s scenarioResult) bool { return s.Run > 0 })
	lead := func(s scenarioResult) string {
		if !repeated {
			return ""
		}
		return strconv.Itoa(s.Run) + "\t"
	}
	if repeated {
		fmt.Fprint(tw, "RUN\t")
	}
	fmt.Fprintln(tw, "SCENARIO\tPATTERN\tPUBSUB\tRAW NATS\tRATIO\tNOTES")
	for _, s := range rep.Scenarios {
		for _, r := range s.Results {
			if r.PubSub.Latency != nil {
				p, raw := r.PubSub.Latency, (*latency)(nil)
				ratio, _ := r.Ratio.(*latency)
				if s.Raw != nil {
					raw = s.Raw.Latency
				}
				rows := []struct {
					name string
					get  func(*latency) float64
				}{
					{"p50", func(l *latency) float64 { return l.P50 }},
					{"p90", func(l *latency) float64 { return l.P90 }},
					{"p99", func(l *latency) float64 { return l.P99 }},
					{"p99.9", func(l *latency) float64 { return l.P999 }},
				}
				for i, row := range rows {
					rawCell, ratioCell, notes := "—", "—", ""
					if raw != nil {
						rawCell = fmt.Sprintf("%.1f µs", row.get(raw))
					}
					if ratio != nil {
						ratioCell = fmt.Sprintf("%.2fx", row.get(ratio))
					}
					if i == 0 {
						notes = r.Notes
					}
					fmt.Fprintf(tw, "%s%s\t%s %s\t%.1f µs\t%s\t%s\t%s\n", lead(s), s.Name, r.Pattern, row.name, row.get(p), rawCell, ratioCell, notes)
				}
				continue
			}
			rawCell, ratioCell := "—", "—"
			if s.Raw != nil {
				rawCell = formatRate(s.Raw.DeliveriesPerSec)
			}
			if x, ok := r.Ratio.(float64); ok {
				ratioCell = fmt.Sprintf("%.2fx", x)
			}
			fmt.Fprintf(tw, "%s%s\t%s\t%s\t%s\t%s\t%s\n", lead(s), s.Name, r.Pattern, formatRate(r.PubSub.DeliveriesPerSec), rawCell, ratioCell, r.Notes)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\nRates in deliveries/s; RATIO is pubsub / raw NATS (deliveries/s: higher is better; latency: lower is better). Total %.1fs.\n", rep.Seconds)
	return err
}

// formatRate formats deliveries per second.
func formatRate(r float64) string {
	switch {
	case r >= 1e6:
		return fmt.Sprintf("%.2f M/s", r/1e6)
	case r >= 1e3:
		return fmt.Sprintf("%.1f k/s", r/1e3)
	}
	return fmt.Sprintf("%.0f /s", r)
}

// ratio returns a/b rounded to 4 decimals, or nil when b is not positive.
func ratio(a, b float64) any {
	if b <= 0 {
		return nil
	}
	return round(a/b, 4)
}

// round rounds x to the given number of decimals.
func round(x float64, decimals int) float64 {
	p := math.Pow(10, float64(decimals))
	return math.Round(x*p) / p
}
