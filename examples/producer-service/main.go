// Command producer-service is a small service that publishes telemetry at a
// steady rate through a BatchingProducer and prints, every second, what the
// messages' futures reported: accepted, rejected, and how many subscriber
// deliveries the accepted messages made.
//
//	go run ./examples/producer-service                              # 3 embedded NATS servers, 5s
//	go run ./examples/producer-service -duration 0 -rate 50000      # until Ctrl-C
//	go run ./examples/producer-service -url nats://localhost:4222   # an existing NATS
//
// With embedded servers it runs the "service" node and two consumer nodes,
// each with one counting subscriber; with -url only the service and one
// consumer. Ctrl-C, SIGTERM or the end of -duration stops producing; the
// producer then publishes what it has queued. With embedded servers it exits
// 1 if nothing was accepted or any message was rejected.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
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

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "comma-separated NATS URLs to use instead of 3 embedded servers")
	prefix := flag.String("prefix", "producer-service", "subject prefix, so the demo does not clash with other apps")
	topic := flag.String("topic", "telemetry", "topic to produce to")
	rate := flag.Int("rate", 20000, "messages per second")
	duration := flag.Duration("duration", 5*time.Second, "how long to produce, in whole seconds; 0: until Ctrl-C")
	flag.Parse()

	// Ctrl-C cancels ctx: setup gives up, or production stops and the
	// deferred cleanups run (nodes first, then connections, then servers).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fail := func(format string, args ...any) int {
		if ctx.Err() != nil {
			format = "interrupted: " + format
		}
		fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
		return 1
	}
	if *rate <= 0 || *duration < 0 {
		return fail("-rate must be positive and -duration not negative")
	}

	// 1. NATS: three routed embedded servers and three nodes, or the URLs
	// given with -url and two nodes. Node 0 produces, the others consume.
	ids := []string{"service", "consumer-1", "consumer-2"}
	var urls []string
	if *url == "" {
		servers, err := embedded.StartCluster(3)
		if err != nil {
			return fail("start embedded NATS: %v", err)
		}
		defer servers.Shutdown()
		urls = servers.URLs()
	} else {
		urls = strings.FieldsFunc(*url, func(r rune) bool { return r == ',' || r == ' ' })
		ids = ids[:2]
	}
	fmt.Printf("nats    %s (prefix %q)\n", strings.Join(urls, " "), *prefix)

	// 2. One connection per node, "its" server first, then Join.
	nodes := make([]*pubsub.Node, len(ids))
	for i, id := range ids {
		own := urls[i%len(urls)]
		list := append([]string{own}, slices.DeleteFunc(slices.Clone(urls), func(u string) bool { return u == own })...)
		nc, err := nats.Connect(strings.Join(list, ","), nats.Name(id), nats.DontRandomize())
		if err != nil {
			return fail("connect %s to %s: %v", id, own, err)
		}
		defer nc.Close()
		jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		nodes[i], err = pubsub.Join(jctx, nc, pubsub.WithPrefix(*prefix), pubsub.WithNodeID(id))
		cancel()
		if err != nil {
			return fail("join %s: %v", id, err)
		}
		defer closeNode(nodes[i])
	}

	// 3. Wait until every node sees all of ours (others may share -url).
	converged := func() bool {
		for _, n := range nodes {
			ours := slices.DeleteFunc(n.Members(), func(m pubsub.Member) bool { return !slices.Contains(ids, m.ID) })
			if len(ours) != len(ids) {
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(10 * time.Second); !converged(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fail("members did not converge within 10s")
		}
	}

	// 4. One counting subscriber per consumer node. Subscribe returns once
	// the topic's owner recorded it: no message produced below misses it.
	received := make([]atomic.Int64, len(nodes)-1)
	for i, n := range nodes[1:] {
		count := &received[i]
		handler := func(context.Context, *pubsub.Message) error { count.Add(1); return nil }
		if _, err := n.Subscribe(ctx, *topic, handler); err != nil {
			return fail("subscribe %s on %s: %v", *topic, n.ID(), err)
		}
	}
	fmt.Printf("ready   %v, producing %d msg/s to %q\n", ids, *rate, *topic)

	// 5. The producer: a batch waits up to 5ms to fill up, and up to 4 are
	// in flight at once (the default MaxInFlight; still delivered in
	// order). A failed attempt (a timeout, the topic's owner moving) is
	// retried after 100ms; after the 5th failed attempt the batch's futures
	// fail and the producer goes on.
	producer, err := pubsub.NewBatchingProducer(nodes[0], *topic, pubsub.ProducerConfig{
		Linger: 5 * time.Millisecond,
		OnPublishError: func(attempt int, err error) pubsub.ErrorDecision {
			fmt.Fprintf(os.Stderr, "publish attempt %d failed: %v\n", attempt, err)
			if attempt < 5 {
				return pubsub.RetryBatch(100 * time.Millisecond)
			}
			return pubsub.FailBatchAndContinue
		},
	})
	if err != nil {
		return fail("producer: %v", err)
	}

	// 6. The collector waits on every future in produce order (the order they
	// complete in) and counts the outcomes. ack.Delivered is the number of
	// subscribers that processed the message's batch, so summing it per
	// message counts deliveries. The buffer holds more than the producer's
	// queue and batches in flight, so sends do not block in practice.
	var accepted, rejected, delivered, failures atomic.Int64
	futures := make(chan *pubsub.Produced, 1<<17)
	collected := make(chan struct{})
	go func() {
		defer close(collected)
		for f := range futures {
			ack, err := f.Wait(context.Background()) // every future completes: Close sees to it
			if err != nil {
				if rejected.Add(1) == 1 {
					fmt.Fprintf(os.Stderr, "first rejection: %s: %v\n", ack.Reason, err)
				}
				continue
			}
			accepted.Add(1)
			delivered.Add(int64(ack.Delivered))
			failures.Add(int64(len(ack.Failures)))
		}
	}()

	// 7. Produce rate/100 messages every 10ms; print the counts of each second.
	var produced, queueFull int64 // touched by this goroutine only
	counts := func() [5]int64 {
		return [5]int64{produced, accepted.Load(), rejected.Load() + queueFull, delivered.Load(), queueFull}
	}
	pace, report := time.NewTicker(10*time.Millisecond), time.NewTicker(time.Second)
	var prev [5]int64
	start := time.Now()
loop:
	for sec, tick := 1, 1; ; {
		select {
		case <-pace.C:
			for range *rate*tick/100 - *rate*(tick-1)/100 { // rate/100, spreading the remainder
				produced++
				msg := fmt.Appendf(nil, `{"sensor":%d,"seq":%d,"ns":%d}`, produced%64, produced, time.Now().UnixNano())
				// Produce neither copies msg nor blocks. Its context is the
				// message's lifetime: with ctx, Ctrl-C would drop the queued ones.
				f := producer.Produce(context.Background(), msg)
				// A full queue answers at once (with a shared future): count it here.
				if _, err, done := f.Result(); done && errors.Is(err, pubsub.ErrQueueFull) {
					queueFull++
					continue
				}
				futures <- f
			}
			tick++
		case <-report.C:
			c := counts()
			fmt.Printf("t=%ds  produced=%d  accepted=%d  rejected=%d  delivered=%d  queue-full=%d\n",
				sec, c[0]-prev[0], c[1]-prev[1], c[2]-prev[2], c[3]-prev[3], c[4]-prev[4])
			prev = c
			if *duration > 0 && time.Since(start) >= *duration-time.Second/2 {
				break loop
			}
			sec++
		case <-ctx.Done():
			fmt.Println("signal  stopping")
			break loop
		}
	}
	stop() // from here on a second Ctrl-C kills the process at once

	// 8. Close publishes what is queued (for up to 5s, then fails the rest
	// with ErrClosed): afterwards every future is done, and the collector
	// ends once it has counted them all.
	cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := producer.Close(cctx); err != nil {
		fmt.Fprintf(os.Stderr, "close producer: %v\n", err)
	}
	drain := time.Since(t0)
	close(futures)
	<-collected

	c := counts()
	fmt.Printf("total   produced=%d  accepted=%d  rejected=%d  delivered=%d  queue-full=%d  delivery-failures=%d\n",
		c[0], c[1], c[2], c[3], c[4], failures.Load())
	fmt.Printf("        producer closed in %v; handlers received", drain.Round(time.Microsecond))
	for i, n := range nodes[1:] {
		fmt.Printf(" %s=%d", n.ID(), received[i].Load())
	}
	fmt.Println()
	if *url == "" && (c[1] == 0 || c[2] > 0) {
		fmt.Fprintf(os.Stderr, "FAIL: %d accepted, %d rejected\n", c[1], c[2])
		return 1
	}
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
