// Command pubsub is a command-line tool for github.com/clusterpubsub/pubsub,
// in the style of the nats CLI.
//
// Six commands look at and use a running cluster. Each joins it as a
// client-only node (WithClientOnly: it never owns a topic), does its work
// and leaves; --url (default $NATS_URL, else nats://127.0.0.1:4222) and
// --prefix say where the cluster is, --timeout bounds connecting, joining
// and each request:
//
//	pubsub members              the view: ID, kind, start time, inbox
//	pubsub topics               every topic with a subscriber (Node.Topics)
//	pubsub topic <topic>        its owner's subscriber counts (Node.TopicStats)
//	pubsub pub <topic> <data>   publish, print the ack (--count, --ack, --key, --header)
//	pubsub sub <topic>          print messages until interrupted (--group, --count)
//	pubsub events               print the tool's node's events (--count)
//
// Against a NATS deployment with authentication or TLS, every command
// (bench too, with --url: the embedded cluster has none) takes the nats
// CLI's connection flags: --user and --password, --token, --creds (a JWT
// and nkey seed file), --nkey (a user nkey seed file), --tlscert and
// --tlskey (a client certificate), --tlsca (the CA that verifies the
// servers), --tlsfirst (TLS before the server's greeting). NATS_USER,
// NATS_PASSWORD, NATS_CREDS, NATS_NKEY, NATS_CERT, NATS_KEY and NATS_CA
// give their defaults when no flag of their kind is given (bench: only
// with --url). Their files are read before connecting, so a missing or
// malformed one fails at once, named; the password and the token are never
// printed, nor are credentials given in --url.
//
// The bench command measures the library beside raw NATS core on the same
// servers in the same run:
//
//	pubsub bench [scenario...] [flags]
//
// For each scenario, raw NATS runs first with nothing else attached to the
// servers; then pubsub nodes join those servers, the library runs the same
// workload, the nodes leave, and the table shows both figures and their
// ratio (pubsub / raw). The scenarios, run in this order by default:
//
//   - fanout: --nodes nodes (node i on server i % servers), one subscriber
//     per node, a BatchingProducer on node 0 producing --count messages of
//     --size bytes to a topic owned by node 1; raw: one publisher connection
//     on server 0, one subscriber connection per server, one NATS message
//     per message. Deliveries per second.
//   - local: one node, --subs local subscribers, a BatchingProducer on the
//     same node; nothing crosses NATS, so there is no raw figure.
//   - latency: one publish at a time, publisher, owner and subscriber on
//     three nodes on three servers, at each ack level (WithAck); raw:
//     request/reply, requester on server 0, responder on server 1.
//     Percentiles p50, p90, p99 and p99.9.
//   - group: a consumer group of --nodes members, one per node, fed by a
//     BatchingProducer on node 0; raw: a NATS queue group of one connection
//     per server fed by one publisher on server 0.
//
// The producer scenarios use one of two patterns: --burst (the default), every
// message produced in a loop with the default ProducerConfig, then a wait for
// the last accepted future, reporting the accepted rate and the share of
// Produce calls rejected with ErrQueueFull; or --window N, at most N futures
// outstanding. --queue, --inflight and --batch set the producer's
// MaxQueueSize, MaxInFlight and BatchSize for either pattern.
//
// --count defaults to 300000 messages for fanout and group, 1000000 for
// local and 5000 publish calls (per ack level) for latency; with every
// default, pubsub bench takes about 3 seconds on a 2-core machine. Nodes
// run with 50 ms heartbeats, as the in-repo benchmarks do, and each
// scenario joins fresh nodes and closes them before the next one starts.
//
// Without --url, bench starts an embedded cluster of --servers NATS servers
// and shuts it down at exit; with --url, node i and raw connection i use
// URL i % len(URLs). --json prints one JSON object instead of the table:
// the run's settings, then per scenario its raw NATS figures ("raw", null
// for local) and its pubsub results, each with "pubsub" figures
// (deliveries_per_sec, queue_full_pct, or latency_us percentiles) and
// "ratio" (pubsub over raw: a number, per-percentile ratios for latency,
// or null). A progress bar of messages done appears on stderr, when it is
// a terminal, for phases running longer than two seconds.
//
// --cpuprofile and --memprofile write the run's CPU and allocation profiles,
// for go tool pprof.
//
// Examples:
//
//	pubsub bench
//	pubsub bench fanout --window 20000
//	pubsub bench --json --count 2000 latency
//	pubsub bench --url nats://a:4222,nats://b:4222,nats://c:4222
//
// Errors go to stderr, and the exit status is then 1.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run runs the command line args (without the program name), writing
// results to stdout and errors, usage and progress to stderr, and returns
// the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		printSummary(stderr)
		return 1
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		printUsage(stdout)
		return 0
	case "bench":
		cfg, err := parseBench(args[1:], stdout)
		if errors.Is(err, errHelpShown) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "pubsub bench: %v\n", err)
			fmt.Fprintln(stderr, "Run 'pubsub bench --help' for usage.")
			return 1
		}
		if err := runBench(ctx, cfg, stdout, stderr); err != nil {
			fmt.Fprintf(stderr, "pubsub bench: %v\n", err)
			return 1
		}
		return 0
	default:
		if c := findClusterCommand(args[0]); c != nil {
			err := runCluster(ctx, c, args[1:], stdout, stderr)
			switch {
			case errors.Is(err, errHelpShown):
				return 0
			case err != nil:
				fmt.Fprintf(stderr, "pubsub %s: %v\n", c.name, err)
				if errors.As(err, new(usageError)) {
					fmt.Fprintf(stderr, "Run 'pubsub %s --help' for usage.\n", c.name)
				}
				return 1
			}
			return 0
		}
		fmt.Fprintf(stderr, "pubsub: unknown command %q\n", args[0])
		printSummary(stderr)
		return 1
	}
}

// printUsage writes the tool's usage, every flag of every command included
// (pubsub help).
func printUsage(w io.Writer) {
	printCommands(w)
	printBenchUsage(w)
	for _, c := range clusterCommands {
		fmt.Fprintln(w)
		c.usage(w)
	}
}

// printSummary writes the commands without their flags: what a mistyped or
// missing command gets, so the error stays on screen.
func printSummary(w io.Writer) {
	printCommands(w)
	fmt.Fprintln(w, "Run 'pubsub help' for every command's flags, or 'pubsub <command> --help' for one.")
}

// printCommands writes the usage line, the commands and the connection
// flags they share.
func printCommands(w io.Writer) {
	fmt.Fprint(w, `pubsub: a command-line tool for github.com/clusterpubsub/pubsub.

Usage:
  pubsub <command> [arguments]

Commands:
  bench [scenario...] [flags]
        compare the library with raw NATS on the same servers, in one run
`)
	for _, c := range clusterCommands {
		fmt.Fprintf(w, "  %s\n        %s\n", c.synopsis(), c.summary)
	}
	fmt.Fprint(w, `  help  show this help

The cluster commands (members to events) join the cluster of --url as a
client-only node, which never owns a topic, and leave at exit.

Every command takes the nats CLI's connection flags for NATS with
authentication or TLS: --user and --password, --token, --creds, --nkey,
--tlscert and --tlskey, --tlsca, --tlsfirst (bench: only with --url).
NATS_USER, NATS_PASSWORD, NATS_CREDS, NATS_NKEY, NATS_CERT, NATS_KEY and
NATS_CA give their defaults when no flag of their kind is given (bench:
only with --url; --url holding credentials sets aside the first four).

`)
}
