// Command quickstart runs a three-node clusterpubsub cluster in one process and
// shows one round of publishing: who owns each topic, every delivery, and the
// PublishAck each publisher gets back.
//
//	go run ./examples/quickstart                                # 3 embedded NATS servers
//	go run ./examples/quickstart -url nats://localhost:4222     # an existing NATS
//
// It exits 0 when every expected delivery arrived and every publish was
// accepted by all subscribers, 1 otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

var (
	nodeIDs = []string{"node-a", "node-b", "node-c"}
	topics  = []string{"greetings", "orders"}
)

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "comma-separated NATS URLs to use instead of 3 embedded servers")
	prefix := flag.String("prefix", "quickstart", "subject prefix, so the demo does not clash with other apps")
	verbose := flag.Bool("v", false, "log the library's debug output to stderr")
	flag.Parse()

	// Ctrl-C cancels ctx: every call below then returns and the deferred
	// cleanups still run (nodes first, then connections, then servers).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fail := func(format string, args ...any) int {
		if ctx.Err() != nil {
			format = "interrupted: " + format
		}
		fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
		return 1
	}

	// 1. NATS: three routed embedded servers, or the URLs given with -url.
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
		for u := range strings.SplitSeq(*url, ",") {
			urls = append(urls, strings.TrimSpace(u))
		}
		fmt.Printf("nats    existing: %s (prefix %q)\n", *url, *prefix)
	}

	// 2. One connection per node, each listing every URL with "its" server first.
	opts := []pubsub.Option{pubsub.WithPrefix(*prefix)}
	if *verbose {
		opts = append(opts, pubsub.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	}
	nodes := make([]*pubsub.Node, len(nodeIDs))
	for i, id := range nodeIDs {
		own := urls[i%len(urls)]
		list := append([]string{own}, slices.DeleteFunc(slices.Clone(urls), func(u string) bool { return u == own })...)
		nc, err := nats.Connect(strings.Join(list, ","), nats.Name(id), nats.DontRandomize())
		if err != nil {
			return fail("connect %s to %s: %v", id, own, err)
		}
		defer nc.Close()

		// 3. Join. The node uses the connection; the caller keeps owning it.
		jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		node, err := pubsub.Join(jctx, nc, append(slices.Clip(opts), pubsub.WithNodeID(id))...)
		cancel()
		if err != nil {
			return fail("join %s: %v", id, err)
		}
		defer func() {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := node.Close(cctx); err != nil {
				fmt.Fprintf(os.Stderr, "close %s: %v\n", id, err)
			}
		}()
		nodes[i] = node
		fmt.Printf("join    %-7s via %s\n", id, own)
	}

	// 4. Wait until every node sees all three members (heartbeats converge).
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	for _, n := range nodes {
		if err := n.WaitMembers(wctx, len(nodes)); err != nil {
			return fail("members did not converge to %d within 10s (another app on prefix %q?): %v", len(nodes), *prefix, err)
		}
	}
	for _, n := range nodes {
		var ids []string
		for _, m := range n.Members() {
			ids = append(ids, m.ID)
		}
		fmt.Printf("members %-7s sees %v\n", n.ID(), ids)
	}

	// 5. Ownership: rendezvous hashing of (topic, node ID) over the members
	// picks one owner per topic. Every node computes it alone; same view,
	// same answer. The owner holds the topic's subscriber list.
	for _, t := range topics {
		var owners []string
		for _, n := range nodes {
			owner, err := n.OwnerOf(t)
			if err != nil {
				return fail("owner of %s: %v", t, err)
			}
			owners = append(owners, owner.ID)
		}
		if len(slices.Compact(owners)) != 1 {
			return fail("nodes disagree on the owner of %s: %v", t, owners)
		}
		fmt.Printf("owner   %-9s -> %s (all %d nodes agree)\n", t, owners[0], len(nodes))
	}

	// 6. One subscriber per node and topic. Subscribe returns once the owner
	// recorded it, so the publishes below cannot miss it.
	var received atomic.Int64
	handler := func(ctx context.Context, m *pubsub.Message) error {
		received.Add(1)
		sub, _ := pubsub.SubscriberFromContext(ctx)
		fmt.Printf("recv    %-18s %-9s %q\n", sub, m.Topic, m.Data)
		return nil
	}
	for _, n := range nodes {
		for _, t := range topics {
			sub, err := n.Subscribe(ctx, t, handler)
			if err != nil {
				return fail("subscribe %s on %s: %v", t, n.ID(), err)
			}
			fmt.Printf("sub     %-18s %s\n", sub.ID(), t)
		}
	}

	// 7. Each node publishes one greeting and a batch of three orders. The ack
	// comes back once every subscriber handled the batch (or failed).
	ok := true
	check := func(from string, ack pubsub.PublishAck, err error) {
		if err != nil { // err != nil exactly when ack.Status == Rejected
			fmt.Printf("ack     topic=%-9s from=%s  %s reason=%s: %v\n", ack.Topic, from, ack.Status, ack.Reason, err)
			ok = false
			return
		}
		fmt.Printf("ack     topic=%-9s from=%s  %s messages=%d delivered=%d failures=%d\n",
			ack.Topic, from, ack.Status, ack.Messages, ack.Delivered, len(ack.Failures))
		for _, f := range ack.Failures {
			fmt.Printf("          failed %s: %s\n", f.Subscriber, f.Status)
		}
		if ack.Delivered != len(nodes) || len(ack.Failures) > 0 {
			ok = false
		}
	}
	for _, n := range nodes {
		ack, err := n.Publish(ctx, "greetings", []byte("hello from "+n.ID()))
		check(n.ID(), ack, err)
		batch := [][]byte{[]byte(n.ID() + " order 1"), []byte(n.ID() + " order 2"), []byte(n.ID() + " order 3")}
		ack, err = n.PublishBatch(ctx, "orders", batch)
		check(n.ID(), ack, err)
	}

	// 8. Verify: every accepted message reached every subscriber.
	want := int64(len(nodes) * len(nodes) * 4) // 3 publishers x 4 messages x 3 subscribers
	waitFor(ctx, 5*time.Second, func() bool { return received.Load() >= want })
	got := received.Load()
	if !ok || got != want {
		return fail("%d of %d deliveries arrived (acks ok: %v)", got, want, ok)
	}
	fmt.Printf("OK      %d deliveries, every publish accepted by all %d subscribers\n", got, len(nodes))
	return 0
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
