package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
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
	{name: "pub", args: "<topic> <data>", summary: "publish data (--count times) and print each ack", minArgs: 2, maxArgs: 2, run: runPub, check: checkPub,
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

func runMembers(_ context.Context, node *pubsub.Node, o *clusterOpts, _ []string, w io.Writer) error {
	members := node.Members()
	if o.json {
		out := make([]memberJSON, 0, len(members))
		for _, m := range members {
			out = append(out, memberJSON{Member: m, Started: started(m), ThisTool: m.ID == node.ID()})
		}
		return writeJSON(w, out)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKIND\tSTARTED\tINBOX")
	for _, m := range members {
		kind := "owner"
		if m.ClientOnly {
			kind = "client"
		}
		if m.ID == node.ID() {
			kind += " (this tool)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.ID, kind, started(m).Format(time.RFC3339), m.Inbox)
	}
	return tw.Flush()
}

// memberJSON is a Member as members --json prints it: its fields, and
// what the table shows beside them, its start time (RFC 3339, in
// nanoseconds) and whether it is this tool's own node.
type memberJSON struct {
	pubsub.Member
	Started  time.Time
	ThisTool bool
}

// started is m's start time: incarnations are start times in nanoseconds
// (Join).
func started(m pubsub.Member) time.Time {
	return time.Unix(0, int64(m.Incarnation)).UTC()
}

func runTopics(ctx context.Context, node *pubsub.Node, o *clusterOpts, _ []string, w io.Writer) error {
	rctx, cancel := requestCtx(ctx, o)
	defer cancel()
	topics, err := node.Topics(rctx)
	if topics == nil {
		topics = []pubsub.TopicInfo{}
	}
	if o.json {
		if jerr := writeJSON(w, topics); jerr != nil {
			return jerr
		}
		return err // partial: the members that did not answer
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tOWNER\tSUBSCRIBERS\tGROUPS")
	for _, t := range topics {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", t.Topic, t.Owner, t.Subscribers, formatCounts(t.Groups))
	}
	if ferr := tw.Flush(); ferr != nil {
		return ferr
	}
	return err
}

func runTopic(ctx context.Context, node *pubsub.Node, o *clusterOpts, args []string, w io.Writer) error {
	rctx, cancel := requestCtx(ctx, o)
	defer cancel()
	st, err := node.TopicStats(rctx, args[0])
	if err != nil {
		return err
	}
	if o.json {
		return writeJSON(w, st)
	}
	fmt.Fprintf(w, "topic:       %s\nowner:       %s\nsubscribers: %d\n", st.Topic, st.Owner, st.Total)
	if len(st.Subscribers) > 0 {
		fmt.Fprintf(w, "per node:    %s\n", formatCounts(st.Subscribers))
	}
	if len(st.Groups) > 0 {
		fmt.Fprintf(w, "groups:      %s\n", formatCounts(st.Groups))
	}
	return nil
}

// formatCounts writes a map of counts as "a=1 b=2", sorted by key; "-"
// when empty.
func formatCounts(m map[string]int) string {
	if len(m) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v))
	}
	slices.Sort(parts)
	return strings.Join(parts, " ")
}

// checkPub checks pub's --count and parses its --ack and --header.
func checkPub(o *clusterOpts) error {
	if o.count < 1 {
		return fmt.Errorf("--count %d: want at least 1", o.count)
	}
	switch o.ack {
	case "delivered":
		o.level = pubsub.AckDelivered
	case "accepted":
		o.level = pubsub.AckAccepted
	case "none":
		o.level = pubsub.AckNone
	default:
		return fmt.Errorf("--ack %q: want delivered, accepted or none", o.ack)
	}
	for _, h := range o.headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			return fmt.Errorf("--header %q: want name:value", h)
		}
		if o.header == nil {
			o.header = pubsub.Header{}
		}
		o.header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	return nil
}

func runPub(ctx context.Context, node *pubsub.Node, o *clusterOpts, args []string, w io.Writer) error {
	msg := []pubsub.Outgoing{{Data: []byte(args[1]), Key: o.key, Header: o.header}}
	for i := range o.count {
		rctx, cancel := requestCtx(ctx, o)
		ack, err := node.PublishMessages(rctx, args[0], msg, pubsub.WithAck(o.level))
		cancel()
		if err != nil {
			return fmt.Errorf("publish %d: %w", i+1, err)
		}
		if o.json {
			if err := writeJSON(w, newAckJSON(ack)); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(w, "%s: %s, %d delivered, %d failed (ack=%s)\n", ack.Topic, ack.Status, ack.Delivered, len(ack.Failures), ack.Level)
		for _, f := range ack.Failures {
			fmt.Fprintf(w, "  %s: %s\n", f.Subscriber, f.Status)
		}
	}
	return nil
}

// ackJSON is a PublishAck as pub --json prints it: its fields, with the
// status, reason, level and each failure's status by name ("accepted",
// "none", "handler-error"), as the table prints them, rather than the
// numbers PublishAck's enums marshal to.
type ackJSON struct {
	Topic     string
	Status    string
	Reason    string
	Messages  int
	Delivered int
	Failures  []failureJSON
	Level     string
}

type failureJSON struct {
	Subscriber pubsub.SubscriberID
	Status     string
	Group      string
}

func newAckJSON(ack pubsub.PublishAck) ackJSON {
	a := ackJSON{Topic: ack.Topic, Status: ack.Status.String(), Reason: ack.Reason.String(), Messages: ack.Messages,
		Delivered: ack.Delivered, Failures: make([]failureJSON, 0, len(ack.Failures)), Level: ack.Level.String()}
	for _, f := range ack.Failures {
		a.Failures = append(a.Failures, failureJSON{Subscriber: f.Subscriber, Status: f.Status.String(), Group: f.Group})
	}
	return a
}

func runSub(ctx context.Context, node *pubsub.Node, o *clusterOpts, args []string, w io.Writer) error {
	got := make(chan struct{}, 1)
	ended := make(chan struct{}) // closed once the subscription ended
	var (
		mu      sync.Mutex // w is not written once runSub returned
		seen    int
		stopped bool
	)
	defer func() {
		mu.Lock()
		stopped = true
		mu.Unlock()
	}()
	handler := func(_ context.Context, m *pubsub.Message) error {
		mu.Lock()
		if stopped {
			mu.Unlock()
			return nil
		}
		seen++
		fmt.Fprintf(w, "[#%d] %s", seen, m.Topic)
		if m.Key != "" {
			fmt.Fprintf(w, " key=%s", m.Key)
		}
		for _, name := range slices.Sorted(maps.Keys(m.Header)) {
			fmt.Fprintf(w, " %s=%s", name, strings.Join(m.Header[name], ","))
		}
		fmt.Fprintf(w, " from %s: %s\n", m.Publisher, m.Data)
		last := o.count > 0 && seen == o.count
		mu.Unlock()
		if last {
			// Hold the batch until the subscription ended: the rest of it
			// (and of the mailbox) is then reported SubscriberGone, and a
			// consumer group's other members get it, instead of being
			// acknowledged unprinted.
			got <- struct{}{}
			<-ended
		}
		return nil
	}
	var opts []pubsub.SubscribeOption
	if o.group != "" {
		opts = append(opts, pubsub.WithGroup(o.group))
	}
	sctx, cancel := requestCtx(ctx, o)
	sub, err := node.Subscribe(sctx, args[0], handler, opts...)
	cancel()
	if err != nil {
		close(ended)
		if ctx.Err() != nil {
			return nil // interrupted while Subscribe waited for the owner: the normal end
		}
		return err
	}
	go func() {
		<-sub.Done() // Unsubscribe below, or the node closing, ends it
		close(ended)
	}()
	defer func() {
		uctx, cancel := requestCtx(context.Background(), o)
		defer cancel()
		_ = sub.Unsubscribe(uctx)
		<-ended
	}()
	select {
	case <-ctx.Done():
		return nil // interrupted: the normal end
	case <-got:
		return nil
	case <-sub.Done():
		return sub.Err()
	}
}

func runEvents(ctx context.Context, node *pubsub.Node, o *clusterOpts, _ []string, w io.Writer) error {
	got := make(chan struct{}, 1)
	// The node stopping on its own (its NATS connection closed for good)
	// ends the command, as it ends sub's subscription: nothing would
	// come after it but the interrupt.
	stopped := make(chan error, 1)
	seen := 0
	cancel := node.Events().Subscribe(func(e pubsub.Event) {
		if s, ok := e.(pubsub.NodeStopped); ok {
			defer func() { stopped <- s.Err }() // once: a node stops once
		}
		if o.count > 0 && seen >= o.count {
			return // the events until cancel stops the listener
		}
		seen++ // one listener goroutine
		fmt.Fprintf(w, "%s %T %+v\n", time.Now().UTC().Format(time.RFC3339Nano), e, e)
		if o.count > 0 && seen >= o.count {
			select {
			case got <- struct{}{}:
			default:
			}
		}
	})
	defer cancel()
	select {
	case <-ctx.Done():
	case <-got:
	case err := <-stopped:
		return err
	}
	return nil
}
