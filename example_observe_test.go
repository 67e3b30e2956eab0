package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// counters is a minimal metrics adapter: it implements both hook
// interfaces with atomic counters, as a Prometheus or OpenTelemetry
// adapter would with its own instruments. Hooks run on the data path, so
// they only count.
type counters struct {
	published, publishFailed, messages atomic.Int64
	handled, handlerFailed             atomic.Int64
}

func (c *counters) OnPublish(i pubsub.PublishInfo) {
	if i.Err != nil {
		c.publishFailed.Add(1)
		return
	}
	c.published.Add(1)
	c.messages.Add(int64(i.Messages))
}

func (c *counters) OnHandled(i pubsub.HandledInfo) {
	if i.Status != pubsub.Delivered {
		c.handlerFailed.Add(1)
		return
	}
	c.handled.Add(1)
}

// Hooks observe every publish on the publishing node and every batch each
// subscriber handled on the subscriber's node: the seam for metrics and
// tracing adapters.
func ExampleWithHooks() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	defer nc.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var m counters
	node, err := pubsub.Join(ctx, nc,
		pubsub.WithHooks(&m),
		pubsub.WithHeartbeatInterval(50*time.Millisecond),
		pubsub.WithMemberTimeout(500*time.Millisecond),
	)
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	if _, err := node.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error { return nil }); err != nil {
		panic(err)
	}

	if _, err := node.PublishBatch(ctx, "orders", [][]byte{[]byte("o-1"), []byte("o-2")}); err != nil {
		panic(err)
	}
	_, err = node.Publish(ctx, "no spaces in topics", []byte("o-3"))
	fmt.Println("rejected:", err != nil)
	// A subscriber's hook runs once its outcome went to the owner, maybe
	// after the ack returned; Close waits for the handlers and their hooks.
	if err := node.Close(ctx); err != nil {
		panic(err)
	}
	fmt.Println("publishes:", m.published.Load(), "messages:", m.messages.Load(), "failed:", m.publishFailed.Load())
	fmt.Println("batches handled:", m.handled.Load(), "failed:", m.handlerFailed.Load())
	// Output:
	// rejected: true
	// publishes: 1 messages: 2 failed: 1
	// batches handled: 1 failed: 0
}

// Topics asks every member for its live subscriptions and lists each
// topic with a subscriber, its owner and its consumer groups.
func ExampleNode_Topics() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	defer nc.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, err := pubsub.Join(ctx, nc,
		pubsub.WithNodeID("inventory-1"),
		pubsub.WithHeartbeatInterval(50*time.Millisecond),
		pubsub.WithMemberTimeout(500*time.Millisecond),
	)
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	handle := func(context.Context, *pubsub.Message) error { return nil }
	for _, opt := range []pubsub.SubscribeOption{pubsub.WithGroup("restock"), pubsub.WithGroup("restock"), nil} {
		if _, err := node.Subscribe(ctx, "stock-low", handle, opt); err != nil {
			panic(err)
		}
	}
	if _, err := node.Subscribe(ctx, "prices", handle); err != nil {
		panic(err)
	}

	topics, err := node.Topics(ctx)
	if err != nil {
		panic(err)
	}
	for _, t := range topics {
		fmt.Printf("%s: owner %s, %d subscribers, groups %v\n", t.Topic, t.Owner, t.Subscribers, t.Groups)
	}
	// Output:
	// prices: owner inventory-1, 1 subscribers, groups map[]
	// stock-low: owner inventory-1, 3 subscribers, groups map[restock:2]
}

// panicReporter is a HandledHook that reports handler panics, as an
// error-tracking adapter would: the value, and where the handler panicked.
type panicReporter struct{ panics chan *pubsub.PanicError }

func (r panicReporter) OnHandled(i pubsub.HandledInfo) {
	var pe *pubsub.PanicError
	if errors.As(i.Err, &pe) {
		r.panics <- pe // buffered: a hook must not block
	}
}

// A handler's panic is recovered: the batch fails HandlerError, the node
// carries on, and the HandledHook gets it as a *PanicError with its value
// and stack.
func ExamplePanicError() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	defer nc.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reporter := panicReporter{panics: make(chan *pubsub.PanicError, 16)}
	node, err := pubsub.Join(ctx, nc, pubsub.WithHooks(reporter),
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	var orders map[string]int // a bug: never made
	if _, err := node.Subscribe(ctx, "orders", func(_ context.Context, m *pubsub.Message) error {
		orders[string(m.Data)]++ // panics: assignment to entry in nil map
		return nil
	}); err != nil {
		panic(err)
	}

	ack, err := node.Publish(ctx, "orders", []byte("o-1"))
	if err != nil {
		panic(err)
	}
	fmt.Println(ack.Status, "delivered:", ack.Delivered, "failures:", ack.Failures[0].Status)
	select {
	case pe := <-reporter.panics:
		fmt.Println(pe.Value)
		fmt.Println("stack names the handler:", strings.Contains(string(pe.Stack), "ExamplePanicError"))
	case <-ctx.Done():
		fmt.Println("no panic reported")
	}
	// Output:
	// accepted delivered: 0 failures: handler-error
	// assignment to entry in nil map
	// stack names the handler: true
}
