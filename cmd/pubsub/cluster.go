package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// clusterCommand is one of the commands that join a running cluster as a
// client-only node: members, topics, topic, pub, sub, events.
type clusterCommand struct {
	name, args, summary string
	// flags adds the command's own flags to fs.
	flags func(fs *flag.FlagSet, o *clusterOpts)
	// minArgs and maxArgs bound its positional arguments (-1: no bound).
	minArgs, maxArgs int
	// check, if set, validates the flags before anything connects.
	check func(o *clusterOpts) error
	run   func(ctx context.Context, node *pubsub.Node, o *clusterOpts, args []string, w io.Writer) error
}

// clusterOpts holds the flags of the cluster commands.
type clusterOpts struct {
	url     string
	prefix  string
	timeout time.Duration
	conn    connFlags
	json    bool
	// pub and sub
	count   int
	ack     string
	key     string
	headers headerFlag
	group   string
	level   pubsub.AckLevel // --ack, parsed
	header  pubsub.Header   // --header, parsed
}

// headerFlag collects repeated --header name:value flags.
type headerFlag []string

func (h *headerFlag) String() string     { return strings.Join(*h, ",") }
func (h *headerFlag) Set(v string) error { *h = append(*h, v); return nil }

var clusterCommands = []*clusterCommand{
	{name: "members", summary: "list the cluster's members: ID, kind (owner or client-only), start time, inbox", maxArgs: 0, run: runMembers,
		flags: func(fs *flag.FlagSet, o *clusterOpts) { jsonFlag(fs, o) }},
	{name: "topics", summary: "list every topic with a live subscriber: owner, subscribers, groups (asks every member)", maxArgs: 0, run: runTopics,
		flags: func(fs *flag.FlagSet, o *clusterOpts) { jsonFlag(fs, o) }},
	{name: "topic", args: "<topic>", summary: "ask a topic's owner for its subscribers per node and its groups", minArgs: 1, maxArgs: 1, run: runTopic,
		flags: func(fs *flag.FlagSet, o *clusterOpts) { jsonFlag(fs, o) }},
	{name: "pub", args: "<topic> <data>", summary: "publish data (--count times) and print each ack; exit status 1 once one is rejected (it stops there), 0 when all were accepted, failures listed or not", minArgs: 2, maxArgs: 2, run: runPub, check: checkPub,
		flags: func(fs *flag.FlagSet, o *clusterOpts) {
			fs.BoolVar(&o.json, "json", false, "print each ack as a JSON object instead of a line (--count N prints N objects, one after another)")
			fs.IntVar(&o.count, "count", 1, "publish the message this many `times` (at least 1), one Publish at a time")
			fs.StringVar(&o.ack, "ack", "delivered", "what each publish waits for: delivered, accepted or none")
			fs.StringVar(&o.key, "key", "", "the message's routing `key` (consumer groups route by it)")
			fs.Var(&o.headers, "header", "a `name:value` header; repeat the flag for more")
		}},
	{name: "sub", args: "<topic>", summary: "subscribe and print each message until interrupted or --count messages", minArgs: 1, maxArgs: 1, run: runSub,
		flags: func(fs *flag.FlagSet, o *clusterOpts) {
			fs.IntVar(&o.count, "count", 0, "stop after this many `messages` (0: until interrupted)")
			fs.StringVar(&o.group, "group", "", "join this consumer `group` instead of receiving every message")
		}},
	{name: "events", summary: "print this tool's node's events (membership changes, metrics snapshots) until interrupted or --count events", maxArgs: 0, run: runEvents,
		flags: func(fs *flag.FlagSet, o *clusterOpts) {
			fs.IntVar(&o.count, "count", 0, "stop after this many `events` (0: until interrupted)")
		}},
}

func jsonFlag(fs *flag.FlagSet, o *clusterOpts) {
	fs.BoolVar(&o.json, "json", false, "print JSON instead of a table")
}

// findClusterCommand returns the cluster command called name, or nil.
func findClusterCommand(name string) *clusterCommand {
	for _, c := range clusterCommands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// flagSet returns c's flag set, the common flags first, writing into o.
func (c *clusterCommand) flagSet(o *clusterOpts) *flag.FlagSet {
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported by runCluster, usage by usage
	url := os.Getenv("NATS_URL")
	if url == "" {
		url = nats.DefaultURL
	}
	fs.StringVar(&o.url, "url", url, "comma-separated NATS server `URLs` of the cluster's NATS, credentials included (nats://user:password@host:port, nats://token@host:port; printed redacted) or given with --user and --password, --token, --creds or --nkey (default: $NATS_URL, else "+nats.DefaultURL+")")
	addConnFlags(fs, &o.conn, "")
	fs.StringVar(&o.prefix, "prefix", natsutil.DefaultPrefix, "the cluster's subject prefix (pubsub.WithPrefix)")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "bound on connecting, joining and each request")
	if c.flags != nil {
		c.flags(fs, o)
	}
	return fs
}

// synopsis is c's command line: "topic <topic> [flags]".
func (c *clusterCommand) synopsis() string {
	return strings.Join(slices.DeleteFunc([]string{c.name, c.args, "[flags]"}, func(s string) bool { return s == "" }), " ")
}

// usage writes c's usage with every flag.
func (c *clusterCommand) usage(w io.Writer) {
	fmt.Fprintf(w, "Usage:\n  pubsub %s\n\n%s.\nJoins the cluster as a client-only node (it never owns a topic) and leaves\nat exit.\n\nFlags:\n", c.synopsis(), upperFirst(c.summary))
	var o clusterOpts
	printFlags(w, c.flagSet(&o))
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// runCluster parses args for c, joins the cluster and runs c. It returns
// errHelpShown after printing the usage for -h.
func runCluster(ctx context.Context, c *clusterCommand, args []string, stdout, stderr io.Writer) error {
	var o clusterOpts
	fs := c.flagSet(&o)
	var pos []string
	for { // flags may follow the arguments, as in bench
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				c.usage(stdout)
				return errHelpShown
			}
			return usageError{err}
		}
		rest := fs.Args()
		if parsed := args[:len(args)-len(rest)]; len(parsed) > 0 && parsed[len(parsed)-1] == "--" {
			pos = append(pos, rest...) // after --, every argument is one
			break
		}
		args = rest
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if c.check != nil { // first: its checks are narrower than the common ones
		if err := c.check(&o); err != nil {
			return usageError{err}
		}
	}
	switch {
	case len(pos) < c.minArgs || c.maxArgs >= 0 && len(pos) > c.maxArgs:
		return usageError{fmt.Errorf("want %s, got %d arguments", orNone(c.args), len(pos))}
	case o.timeout <= 0:
		return usageError{fmt.Errorf("--timeout %v: want a positive duration", o.timeout)}
	case o.count < 0:
		return usageError{fmt.Errorf("--count %d: want 0 or more", o.count)}
	}
	if err := natsutil.ValidatePrefix(o.prefix); err != nil {
		return usageError{fmt.Errorf("--prefix: %w", err)}
	}
	o.conn.useEnv(fs, o.url, os.Getenv)
	if err := o.conn.check(o.url); err != nil {
		return usageError{err}
	}
	auth, err := o.conn.options()
	if err != nil {
		return err
	}

	// The connection's losses and recoveries are told on stderr, as the
	// nats CLI does: a command waiting for messages or events would
	// otherwise say nothing while nats.go tries to reconnect (2 minutes by
	// default), and then end with only "connection closed".
	nc, err := connect(ctx, o.url, append([]nats.Option{nats.Name("pubsub-cli-" + c.name), nats.Timeout(o.timeout), nats.NoCallbacksAfterClientClose(),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			fmt.Fprintf(stderr, "pubsub %s: disconnected from NATS (%v); reconnecting\n", c.name, err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			fmt.Fprintf(stderr, "pubsub %s: reconnected to %s\n", c.name, nc.ConnectedUrlRedacted())
		})}, auth...)...)
	if err != nil {
		return fmt.Errorf("connect to %s%s: %w", redactURLs(o.url), o.conn.describe(), err)
	}
	defer nc.Close()
	jctx, cancel := context.WithTimeout(ctx, o.timeout)
	node, err := pubsub.Join(jctx, nc, pubsub.WithClientOnly(), pubsub.WithPrefix(o.prefix), pubsub.WithNodeID("pubsub-cli-"+newRunID()))
	cancel()
	if err != nil {
		return fmt.Errorf("join the cluster at %s (prefix %q): %w", redactURLs(o.url), o.prefix, err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), o.timeout)
		defer cancel()
		_ = node.Close(cctx) // announces the leave
	}()
	if !seesOwners(node) {
		// Join succeeds in an empty cluster, and a wrong prefix looks like
		// one: say so instead of printing empty tables or failing later
		// with ErrNoMembers.
		fmt.Fprintf(stderr, "pubsub %s: no pubsub node answered under prefix %q at %s; check --prefix (the nodes' pubsub.WithPrefix)\n", c.name, o.prefix, redactURLs(o.url))
	}
	return c.run(ctx, node, &o, pos, stdout)
}

// seesOwners reports whether node's view holds a member that can own
// topics (not client-only).
func seesOwners(node *pubsub.Node) bool {
	return slices.ContainsFunc(node.Members(), func(m pubsub.Member) bool { return !m.ClientOnly })
}

// connect is nats.Connect, but returns as soon as ctx ends (an interrupt):
// nats.Connect takes no context, and a server that accepts the connection
// and never answers holds it for the whole --timeout. A connection made
// after ctx ended is closed.
func connect(ctx context.Context, url string, opts ...nats.Option) (*nats.Conn, error) {
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(url, opts...)
		done <- result{nc, err}
	}()
	select {
	case r := <-done:
		return r.nc, r.err
	case <-ctx.Done():
		go func() {
			if r := <-done; r.nc != nil {
				r.nc.Close()
			}
		}()
		return nil, fmt.Errorf("interrupted while connecting: %w", context.Cause(ctx))
	}
}

// redactURLs returns a comma-separated list of NATS URLs fit to print:
// the password of each, or a token (a user without one, as nats.go reads
// it), replaced with xxxxx, as nats.go's ConnectedUrlRedacted does. Errors
// name --url, which may hold credentials; those of the flags (connFlags)
// are never printed.
func redactURLs(urls string) string {
	parts := strings.Split(urls, ",")
	for i, s := range parts {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil || u.User == nil {
			continue
		}
		if _, ok := u.User.Password(); !ok {
			u.User = url.User("xxxxx")
		}
		parts[i] = u.Redacted()
	}
	return strings.Join(parts, ",")
}

// usageError is a command line the command cannot run: run then points at
// its --help.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func orNone(args string) string {
	if args == "" {
		return "no arguments"
	}
	return args
}

// requestCtx bounds one request by --timeout.
func requestCtx(ctx context.Context, o *clusterOpts) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, o.timeout)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
