package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// Scenario names, in the order bench runs them by default.
const (
	scenarioFanout  = "fanout"
	scenarioLocal   = "local"
	scenarioLatency = "latency"
	scenarioGroup   = "group"
)

var allScenarios = []string{scenarioFanout, scenarioLocal, scenarioLatency, scenarioGroup}

// defaultCount is each scenario's --count when the flag is not set: messages
// for the producer scenarios, publish calls for latency.
var defaultCount = map[string]int{
	scenarioFanout:  300_000,
	scenarioLocal:   1_000_000,
	scenarioLatency: 5_000,
	scenarioGroup:   300_000,
}

// benchConfig is a parsed bench command line.
type benchConfig struct {
	scenarios []string
	urls      []string // empty: an embedded cluster of servers servers
	servers   int
	nodes     int
	subs      int
	count     int // 0: the scenario's defaultCount
	size      int
	window    int  // 0: the burst pattern
	queue     int  // ProducerConfig.MaxQueueSize; 0: the default
	inflight  int  // ProducerConfig.MaxInFlight; 0: the default
	batch     int  // ProducerConfig.BatchSize; 0: the default
	block     bool // ProducerConfig.BlockWhenFull
	prefix    string
	json      bool
	repeat    int // runs of the scenario list in one process
	timeout   time.Duration
	// cpuProfile and memProfile name the files the run's CPU and
	// allocation profiles go to ("": none).
	cpuProfile, memProfile string
	// auth holds the options of the connection flags (--user to --tlsca),
	// for every connection; authNote describes them for errors.
	auth     []nats.Option
	authNote string
}

// countFor returns the number of messages (or calls) of scenario.
func (c *benchConfig) countFor(scenario string) int {
	if c.count > 0 {
		return c.count
	}
	return defaultCount[scenario]
}

// maxWindow is the largest --window: the producer's MaxQueueSize, past
// which Produce is rejected with ErrQueueFull.
func (c *benchConfig) maxWindow() int {
	if c.queue > 0 {
		return c.queue
	}
	return pubsub.DefaultMaxQueueSize
}

// producerConfig is the ProducerConfig the pattern and flags ask for.
func (c *benchConfig) producerConfig() pubsub.ProducerConfig {
	return pubsub.ProducerConfig{MaxQueueSize: c.queue, MaxInFlight: c.inflight, BatchSize: c.batch, BlockWhenFull: c.block}
}

// pattern names the producer pattern, as the table and the JSON show it.
func (c *benchConfig) pattern() string {
	name := "burst"
	if c.window > 0 {
		name = fmt.Sprintf("window %d", c.window)
	}
	if c.queue > 0 {
		name += fmt.Sprintf(" queue %d", c.queue)
	}
	if c.inflight > 0 {
		name += fmt.Sprintf(" inflight %d", c.inflight)
	}
	if c.batch > 0 {
		name += fmt.Sprintf(" batch %d", c.batch)
	}
	if c.block {
		name += " block"
	}
	return name
}

// benchFlags holds the destinations of the bench flag set.
type benchFlags struct {
	url      string
	servers  int
	nodes    int
	subs     int
	count    int
	size     int
	burst    bool
	window   int
	queue    int
	inflight int
	batch    int
	block    bool
	prefix   string
	json     bool
	repeat   int
	timeout  time.Duration
	cpuProf  string
	memProf  string
	conn     connFlags
}

// newBenchFlagSet returns the flag set of the bench command, writing into f.
func newBenchFlagSet(f *benchFlags) *flag.FlagSet {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported by run, usage by printBenchUsage
	fs.StringVar(&f.url, "url", "", "comma-separated NATS server `URLs`, credentials included (nats://user:password@host:port, nats://token@host:port; printed redacted); or given with --user and --password, --token, --creds or --nkey; node i and raw connection i use URL i % count (default: an embedded cluster of --servers servers, shut down at exit)")
	addConnFlags(fs, &f.conn, "; only with --url: the embedded cluster has neither authentication nor TLS")
	fs.IntVar(&f.servers, "servers", 3, "embedded NATS servers to start, when --url is not set")
	fs.IntVar(&f.nodes, "nodes", 3, "pubsub nodes in fanout (one subscriber each) and group (one member each); latency always uses 3")
	fs.IntVar(&f.subs, "subs", 3, "local subscribers in the local scenario")
	fs.IntVar(&f.count, "count", 0, "messages per scenario, publish calls for latency (default: fanout 300000, local 1000000, latency 5000, group 300000)")
	fs.IntVar(&f.size, "size", 128, "message payload size in `bytes`")
	fs.BoolVar(&f.burst, "burst", false, "producer pattern: Produce every message in a loop with the default ProducerConfig (but --queue, --inflight, --batch and --block), wait for the last accepted future, report the accepted rate and the % rejected with ErrQueueFull (default: the pattern unless --window is set)")
	fs.IntVar(&f.window, "window", 0, "producer pattern: keep at most `N` futures outstanding (1 to the queue size), the default ProducerConfig (but --queue, --inflight, --batch and --block) (default 0: --burst)")
	fs.IntVar(&f.queue, "queue", 0, fmt.Sprintf("the producer's MaxQueueSize in `messages`, for either pattern (default 0: the library's default, %d)", pubsub.DefaultMaxQueueSize))
	fs.IntVar(&f.inflight, "inflight", 0, fmt.Sprintf("the producer's MaxInFlight in `batches`, for either pattern (default 0: the library's default, %d)", pubsub.DefaultMaxInFlight))
	fs.IntVar(&f.batch, "batch", 0, fmt.Sprintf("the producer's BatchSize in `messages`, for either pattern (default 0: the library's default, %d)", pubsub.DefaultBatchSize))
	fs.BoolVar(&f.block, "block", false, "the producer's BlockWhenFull, for either pattern: Produce waits for room in a full queue instead of failing with ErrQueueFull, so a burst is back-pressured rather than mostly rejected (default false: the library's default)")
	fs.StringVar(&f.prefix, "prefix", "pubsub-bench", "subject prefix of the pubsub nodes; raw NATS subjects are <prefix>.raw.*")
	fs.BoolVar(&f.json, "json", false, "print one JSON object with every scenario's figures instead of the table")
	fs.IntVar(&f.repeat, "repeat", 1, "run the scenarios `N` times in this process, on the same servers, one run after the other, each whole (raw NATS first, then nodes join anew, and leave), numbered RUN in the table and \"run\" in the JSON: the spread of several runs from one command")
	fs.DurationVar(&f.timeout, "timeout", 5*time.Minute, "overall time limit of the run")
	fs.StringVar(&f.cpuProf, "cpuprofile", "", "write a CPU profile of the whole run to `file`, for go tool pprof: this process only, so the raw NATS phases and, without --url, the embedded servers are in it too (look at the pubsub functions)")
	fs.StringVar(&f.memProf, "memprofile", "", "write an allocation profile to `file` when the run ends, for go tool pprof (-sample_index=alloc_space: what the whole run allocated; inuse_space: what is still held)")
	return fs
}

// errHelpShown reports that --help was asked for and the usage printed.
var errHelpShown = errors.New("help shown")

// parseBench parses the arguments of the bench command. Flags and scenario
// names may be interleaved. On --help it prints the usage to stdout and
// returns errHelpShown.
func parseBench(args []string, stdout io.Writer) (*benchConfig, error) {
	var f benchFlags
	fs := newBenchFlagSet(&f)
	var names []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printBenchUsage(stdout)
				return nil, errHelpShown
			}
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		names = append(names, args[0])
		args = args[1:]
	}
	set := setOnCommandLine(fs)

	cfg := &benchConfig{
		servers:  f.servers,
		nodes:    f.nodes,
		subs:     f.subs,
		count:    f.count,
		size:     f.size,
		window:   f.window,
		queue:    f.queue,
		inflight: f.inflight,
		batch:    f.batch,
		block:    f.block,
		prefix:   f.prefix,
		json:     f.json,
		repeat:   f.repeat,
		timeout:  f.timeout,

		cpuProfile: f.cpuProf,
		memProfile: f.memProf,
	}
	for _, n := range names {
		switch {
		case n == "all":
			cfg.scenarios = append(cfg.scenarios, allScenarios...)
		case slices.Contains(allScenarios, n):
			cfg.scenarios = append(cfg.scenarios, n)
		default:
			return nil, fmt.Errorf("unknown scenario %q (want one of %s, or all)", n, strings.Join(allScenarios, ", "))
		}
	}
	if len(cfg.scenarios) == 0 {
		cfg.scenarios = allScenarios
	}
	cfg.scenarios = slices.Compact(cfg.scenarios)

	if f.url != "" {
		for u := range strings.SplitSeq(f.url, ",") {
			if u = strings.TrimSpace(u); u != "" {
				cfg.urls = append(cfg.urls, u)
			}
		}
		if len(cfg.urls) == 0 {
			return nil, fmt.Errorf("--url %q holds no URL", f.url)
		}
		if set["servers"] {
			return nil, errors.New("--servers starts embedded servers: it cannot be used with --url")
		}
	}
	if given := f.conn.given(fs); len(given) > 0 && f.url == "" {
		return nil, fmt.Errorf("%s: only with --url (the embedded cluster has neither authentication nor TLS)", strings.Join(given, ", "))
	}
	if f.url != "" {
		// Not with the embedded cluster, which has no authentication: a
		// user's NATS_CREDS must not stop a plain bench.
		f.conn.useEnv(fs, f.url, os.Getenv)
	}
	if err := f.conn.check(f.url); err != nil {
		return nil, err
	}
	switch {
	case cfg.servers < 1:
		return nil, fmt.Errorf("--servers %d: want at least 1", cfg.servers)
	case cfg.nodes < 1:
		return nil, fmt.Errorf("--nodes %d: want at least 1", cfg.nodes)
	case cfg.subs < 1:
		return nil, fmt.Errorf("--subs %d: want at least 1", cfg.subs)
	case set["count"] && cfg.count < 1:
		return nil, fmt.Errorf("--count %d: want at least 1", cfg.count)
	case cfg.size < 0:
		return nil, fmt.Errorf("--size %d: want at least 0", cfg.size)
	case set["queue"] && cfg.queue < 1:
		return nil, fmt.Errorf("--queue %d: want at least 1", cfg.queue)
	case set["inflight"] && cfg.inflight < 1:
		return nil, fmt.Errorf("--inflight %d: want at least 1", cfg.inflight)
	case set["batch"] && cfg.batch < 1:
		return nil, fmt.Errorf("--batch %d: want at least 1", cfg.batch)
	case set["window"] && (cfg.window < 1 || cfg.window > cfg.maxWindow()):
		return nil, fmt.Errorf("--window %d: want 1 to %d (the producer's MaxQueueSize; raise it with --queue)", cfg.window, cfg.maxWindow())
	case set["window"] && set["burst"] && f.burst:
		return nil, errors.New("--burst and --window exclude each other")
	case set["burst"] && !f.burst:
		return nil, errors.New("--burst=false: choose a pattern with --window N instead")
	case cfg.repeat < 1:
		return nil, fmt.Errorf("--repeat %d: want at least 1", cfg.repeat)
	case cfg.timeout <= 0:
		return nil, fmt.Errorf("--timeout %v: want a positive duration", cfg.timeout)
	case cfg.cpuProfile != "" && cfg.cpuProfile == cfg.memProfile:
		return nil, fmt.Errorf("--cpuprofile and --memprofile both name %q: give each profile a file of its own", cfg.cpuProfile)
	}
	if err := natsutil.ValidatePrefix(cfg.prefix); err != nil {
		return nil, fmt.Errorf("--prefix: %w", err)
	}
	// Last: it reads the files the connection flags name.
	auth, err := f.conn.options()
	if err != nil {
		return nil, err
	}
	cfg.auth, cfg.authNote = auth, f.conn.describe()
	return cfg, nil
}

// printBenchUsage writes the usage of the bench command, every flag with
// its default included.
func printBenchUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage:
  pubsub bench [scenario...] [flags]

Runs the library and raw NATS side by side on the same servers, raw NATS
first with nothing else attached to the servers, then pubsub nodes join, and
prints both figures and their ratio (pubsub / raw: higher is better for
deliveries/s, lower is better for latencies).

Scenarios (default: all, in this order):
  fanout   --nodes nodes, one subscriber each, a BatchingProducer on node 0;
           raw: 1 publisher on server 0, 1 subscriber connection per server
  local    1 node, --subs local subscribers, a BatchingProducer on the node;
           no raw baseline (nothing crosses NATS)
  latency  one publish at a time, publisher, owner and subscriber on 3 nodes
           on 3 servers, at each ack level; raw: request/reply, requester on
           server 0, responder on server 1; p50, p90, p99, p99.9
  group    a consumer group of --nodes members (one per node), a
           BatchingProducer on node 0; raw: a NATS queue group of one
           connection per server, 1 publisher on server 0

Examples:
  pubsub bench
  pubsub bench fanout --window 20000
  pubsub bench --json --count 2000 latency
  pubsub bench fanout --repeat 3
  pubsub bench --url nats://a:4222,nats://b:4222,nats://c:4222

Flags:
`)
	var f benchFlags
	printFlags(w, newBenchFlagSet(&f))
}

// printFlags writes every flag of fs with its usage and default.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(fl *flag.Flag) {
		name, usage := flag.UnquoteUsage(fl)
		if name == "value" {
			name = "" // a boolean
		}
		head := "  --" + fl.Name
		if name != "" {
			head += " " + name
		}
		fmt.Fprintf(w, "%s\n", head)
		switch {
		case strings.Contains(usage, "(default"):
		case fl.DefValue == "": // "(default )" read as a typo
			usage += " (default: none)"
		default:
			usage += fmt.Sprintf(" (default %s)", fl.DefValue)
		}
		for line := range strings.SplitSeq(wrap(usage, 68), "\n") {
			fmt.Fprintf(w, "        %s\n", line)
		}
	})
}

// wrap re-flows s into lines of at most width bytes.
func wrap(s string, width int) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(s) {
		if i > 0 {
			if n+1+len(word) > width {
				b.WriteByte('\n')
				n = 0
			} else {
				b.WriteByte(' ')
				n++
			}
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}
