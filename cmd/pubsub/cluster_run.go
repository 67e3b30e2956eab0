package main

// The bodies of the cluster commands (cluster.go parses their flags,
// joins the cluster and runs them): each prints what the client-only node
// sees or does, as a table or, with --json, as JSON.

import (
	"context"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/clusterpubsub/pubsub"
)

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
		fmt.Fprintln(w, formatEvent(e))
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

// formatEvent writes one event as a line: its own time (UTC; the time it
// was printed for an event without one), its kind and its fields as
// name=value.
func formatEvent(e pubsub.Event) string {
	v := reflect.ValueOf(e)
	t := v.Type()
	at := time.Now()
	if f := v.FieldByName("Time"); f.IsValid() {
		if tm, ok := f.Interface().(time.Time); ok && !tm.IsZero() {
			at = tm
		}
	}
	var b strings.Builder
	b.WriteString(at.UTC().Format(time.RFC3339Nano))
	b.WriteString(" ")
	b.WriteString(t.Name())
	for i := range t.NumField() {
		if f := t.Field(i); f.IsExported() && f.Name != "Time" {
			fmt.Fprintf(&b, " %s=%v", f.Name, v.Field(i).Interface())
		}
	}
	return b.String()
}
