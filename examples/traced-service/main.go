// Command traced-service shows the message envelope: a typed topic of
// orders, produced with a routing key, a header and a trace context that a
// Propagator injects on the publishing node and extracts on the subscribing
// one.
//
//	go run ./examples/traced-service                                # 3 embedded NATS servers
//	go run ./examples/traced-service -url nats://localhost:4222     # an existing NATS
//
// The "checkout" node produces orders through a TypedProducer (and publishes
// one more with Topic.PublishMessage); the "billing" node subscribes to them
// through a Topic. With embedded servers a third node, "ledger", joins too:
// it may own the topic, and then every batch travels checkout -> ledger ->
// billing with its envelope intact. Every node is given the same toy
// Propagator, a stand-in for an OpenTelemetry one.
//
// It exits 0 when every order arrived exactly once, with its key, its header
// and the trace its producer's ctx carried, and the orders of each key in
// the order they were produced; 1 otherwise.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// Order is the payload of the "orders" topic, encoded as JSON by the
// topic's codec.
type Order struct {
	ID       int     `json:"id"`
	Customer string  `json:"customer"`
	Amount   float64 `json:"amount"`
}

// The toy trace context. It is a stand-in, enough to show where a
// Propagator sits: a real service would pass an adapter around an
// OpenTelemetry propagator (propagation.TraceContext) instead, which reads
// and writes the span context of an OpenTelemetry ctx. The core package
// never imports OpenTelemetry; it only calls Inject and Extract.

// traceID is a W3C trace ID: 32 lowercase hex digits.
type traceID string

// traceKey is the private ctx key under which a traceID is stored.
type traceKey struct{}

// withTrace returns ctx carrying id.
func withTrace(ctx context.Context, id traceID) context.Context {
	return context.WithValue(ctx, traceKey{}, id)
}

// traceFrom returns the traceID ctx carries, or "".
func traceFrom(ctx context.Context) traceID {
	id, _ := ctx.Value(traceKey{}).(traceID)
	return id
}

// newTraceID returns a random traceID.
func newTraceID() traceID { return traceID(randomHex(16)) }

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// traceContext is a toy W3C-style Propagator: it writes the ctx's trace as
// a "traceparent" header, "00-<trace>-<span>-01", and reads it back.
type traceContext struct{}

var _ pubsub.Propagator = traceContext{}

// Inject runs on the publishing node for each message, with the ctx given
// to ProduceMessage or PublishMessage. Each publish is a new span of the
// trace, hence a fresh span ID.
func (traceContext) Inject(ctx context.Context, h pubsub.Header) {
	if id := traceFrom(ctx); id != "" {
		h.Set("traceparent", fmt.Sprintf("00-%s-%s-01", id, randomHex(8)))
	}
}

// Extract runs on each subscriber's node for each message; the handler gets
// the ctx it returns. A message without a (valid) traceparent leaves ctx
// as it is.
func (traceContext) Extract(ctx context.Context, h pubsub.Header) context.Context {
	parts := strings.Split(h.Get("traceparent"), "-") // Get on a nil Header is ""
	if len(parts) != 4 || parts[0] != "00" || len(parts[1]) != 32 || len(parts[2]) != 16 {
		return ctx
	}
	return withTrace(ctx, traceID(parts[1]))
}

// arrival is what the subscriber saw of one order.
type arrival struct {
	order     Order
	key       string
	tenant    string
	publisher string
	trace     traceID
}

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "comma-separated NATS URLs to use instead of 3 embedded servers")
	prefix := flag.String("prefix", "traced-service", "subject prefix, so the demo does not clash with other apps")
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

	// 1. NATS: three routed embedded servers and three nodes, or the URLs
	// given with -url and two nodes. Node 0 publishes, node 1 subscribes.
	ids := []string{"checkout", "billing", "ledger"}
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
		ids = ids[:2]
		fmt.Printf("nats    existing: %s (prefix %q)\n", *url, *prefix)
	}

	// 2. One connection per node, "its" server first, then Join with the
	// same Propagator on every node: the publisher's node injects, the
	// subscriber's node extracts. Connections are closed after all nodes.
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
		node, err := pubsub.Join(jctx, nc,
			pubsub.WithPrefix(*prefix), pubsub.WithNodeID(id), pubsub.WithPropagator(traceContext{}))
		jcancel()
		if err != nil {
			return fail("join %s: %v", id, err)
		}
		nodes = append(nodes, node)
		fmt.Printf("join    %-8s via %s\n", id, own)
	}
	checkout, billing := nodes[0], nodes[1]

	// 3. Wait until every node sees all of ours (others may share -url), so
	// that they agree on the owner of "orders".
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
	if owner, err := checkout.OwnerOf("orders"); err == nil {
		fmt.Printf("owner   orders -> %s\n", owner.ID)
	}

	// 4. The subscriber: a typed view of "orders" on billing. The handler
	// gets the decoded Order, the Message with its envelope (Key, Header,
	// Publisher), and a ctx that the Propagator's Extract filled in.
	sub, err := pubsub.NewTopic(billing, "orders", pubsub.JSONCodec[Order]())
	if err != nil {
		return fail("topic on %s: %v", billing.ID(), err)
	}
	var (
		mu       sync.Mutex
		arrivals []arrival
	)
	_, err = sub.Subscribe(ctx, func(ctx context.Context, o Order, m *pubsub.Message) error {
		a := arrival{order: o, key: m.Key, tenant: m.Header.Get("tenant"), publisher: m.Publisher, trace: traceFrom(ctx)}
		fmt.Printf("recv    order %d %-5s %6.2f  key=%-5s tenant=%s from=%s trace=%s\n",
			o.ID, o.Customer, o.Amount, a.key, a.tenant, a.publisher, a.trace)
		mu.Lock()
		arrivals = append(arrivals, a)
		mu.Unlock()
		return nil
	})
	if err != nil { // Subscribe returns once the owner recorded it: nothing below misses it
		return fail("subscribe orders on %s: %v", billing.ID(), err)
	}

	// 5. The publisher: the same topic on checkout, and a TypedProducer over
	// it with up to 4 batches in flight (still delivered in order).
	orders, err := pubsub.NewTopic(checkout, "orders", pubsub.JSONCodec[Order]())
	if err != nil {
		return fail("topic on %s: %v", checkout.ID(), err)
	}
	producer, err := pubsub.NewTypedProducer(orders, pubsub.ProducerConfig{})
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

	// 6. Produce each order with its customer as the key, a tenant header,
	// and a ctx carrying a trace of its own: Inject turns that trace into
	// the message's traceparent header. The last order goes out directly
	// with Topic.PublishMessage once the produced ones are acked, so it
	// comes after them in its key's order too.
	batch := []Order{
		{1, "alice", 12.50}, {2, "bob", 7.25}, {3, "alice", 3.10},
		{4, "carol", 99.00}, {5, "bob", 18.40}, {6, "alice", 42.00},
	}
	direct := Order{7, "carol", 5.75}
	traces := make(map[int]traceID) // order ID -> the trace its publisher's ctx carried
	header := pubsub.Header{"tenant": {"acme"}}
	ok := true
	checkAck := func(o Order, how string, ack pubsub.PublishAck, err error) {
		if err != nil { // err != nil exactly when ack.Status == Rejected
			fmt.Printf("ack     order %d %-7s %s reason=%s: %v\n", o.ID, how, ack.Status, ack.Reason, err)
			ok = false
			return
		}
		fmt.Printf("ack     order %d %-7s %s delivered=%d failures=%d\n", o.ID, how, ack.Status, ack.Delivered, len(ack.Failures))
		if ack.Delivered != 1 || len(ack.Failures) > 0 { // one subscriber: billing's
			ok = false
		}
	}
	futures := make([]*pubsub.Produced, len(batch))
	for i, o := range batch {
		traces[o.ID] = newTraceID()
		fmt.Printf("send    order %d %-5s %6.2f  key=%-5s trace=%s\n", o.ID, o.Customer, o.Amount, o.Customer, traces[o.ID])
		// The header given is never modified (Inject adds to a copy of it),
		// so one map serves every order.
		futures[i] = producer.ProduceMessage(withTrace(ctx, traces[o.ID]), o,
			pubsub.Outgoing{Key: o.Customer, Header: header})
	}
	for i, f := range futures { // futures complete in produce order
		ack, err := f.Wait(ctx)
		checkAck(batch[i], "produce", ack, err)
	}
	traces[direct.ID] = newTraceID()
	fmt.Printf("send    order %d %-5s %6.2f  key=%-5s trace=%s\n", direct.ID, direct.Customer, direct.Amount, direct.Customer, traces[direct.ID])
	ack, err := orders.PublishMessage(withTrace(ctx, traces[direct.ID]), direct,
		pubsub.Outgoing{Key: direct.Customer, Header: header})
	checkAck(direct, "publish", ack, err)

	// 7. Verify. An accepted ack with delivered=1 means billing's handler
	// already ran; the poll only bounds the wait should an ack be missing.
	all := append(slices.Clone(batch), direct)
	waitFor(ctx, 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(arrivals) >= len(all)
	})
	mu.Lock()
	got := slices.Clone(arrivals)
	mu.Unlock()
	var problems []string
	seen := make(map[int]int)
	perKey := make(map[string][]int) // key -> order IDs in arrival order
	for _, a := range got {
		id := a.order.ID
		seen[id]++
		perKey[a.key] = append(perKey[a.key], id)
		switch {
		case a.key != a.order.Customer:
			problems = append(problems, fmt.Sprintf("order %d arrived with key %q, want %q", id, a.key, a.order.Customer))
		case a.tenant != "acme":
			problems = append(problems, fmt.Sprintf("order %d arrived with tenant %q, want %q", id, a.tenant, "acme"))
		case a.publisher != checkout.ID():
			problems = append(problems, fmt.Sprintf("order %d arrived from %q, want %q", id, a.publisher, checkout.ID()))
		case a.trace == "" || a.trace != traces[id]:
			problems = append(problems, fmt.Sprintf("order %d arrived with trace %q, want %q", id, a.trace, traces[id]))
		}
	}
	wantKey := make(map[string][]int)
	for _, o := range all {
		if seen[o.ID] != 1 {
			problems = append(problems, fmt.Sprintf("order %d arrived %d times, want once", o.ID, seen[o.ID]))
		}
		wantKey[o.Customer] = append(wantKey[o.Customer], o.ID)
	}
	for key, want := range wantKey {
		if !slices.Equal(perKey[key], want) {
			problems = append(problems, fmt.Sprintf("key %s: orders arrived as %v, want %v", key, perKey[key], want))
		}
	}
	if len(got) != len(all) {
		problems = append(problems, fmt.Sprintf("%d arrivals, want %d", len(got), len(all)))
	}
	if !ok {
		problems = append(problems, "not every publish was accepted and delivered to the subscriber")
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		return fail("%s", strings.Join(problems, "; "))
	}
	fmt.Println("--- done: every order arrived with its key, header and trace")
	return 0
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
