package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// A service shuts down in the reverse order of its start: its producers
// first (each publishes what it queued while the node still serves), then
// the node (it announces the leave, hands its topics over and ends its
// subscriptions with ErrClosed), then the NATS connection, which the node
// never closes. A real service waits for SIGINT or SIGTERM first, with
// signal.NotifyContext, and gives each Close a context of its own: the one
// the service ran under has ended by then.
func ExampleNode_Close() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, err := pubsub.Join(ctx, nc,
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	sub, err := node.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error { return nil })
	if err != nil {
		panic(err)
	}
	p, err := pubsub.NewBatchingProducer(node, "orders", pubsub.ProducerConfig{AckLevel: pubsub.AckAccepted})
	if err != nil {
		panic(err)
	}
	last := p.Produce(ctx, []byte("order-1"))

	// ... the service runs until <-ctx.Done() of signal.NotifyContext ...

	closeCtx, closeCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer closeCancel()
	fmt.Println("producer closed:", p.Close(closeCtx))
	ack, err := last.Wait(closeCtx)
	fmt.Println("last message:", ack.Status, err)
	fmt.Println("node closed:", node.Close(closeCtx))
	nc.Close()

	<-sub.Done()
	fmt.Println("subscription ended with ErrClosed:", errors.Is(sub.Err(), pubsub.ErrClosed))
	_, err = node.Publish(closeCtx, "orders", []byte("too late"))
	fmt.Println("publish after Close fails with ErrClosed:", errors.Is(err, pubsub.ErrClosed))
	// Output:
	// producer closed: <nil>
	// last message: accepted <nil>
	// node closed: <nil>
	// subscription ended with ErrClosed: true
	// publish after Close fails with ErrClosed: true
}

// A subscriber whose handler fails EvictAfter times in a row is evicted by
// the topic's owner: each ack lists it as HandlerError, then its Done
// channel closes and Err wraps ErrEvicted. Nothing reaches it any more; the
// application decides whether to Subscribe again.
func ExampleSubscription_Err() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx, pubsub.WithEvictAfter(2))
	defer stop()

	sub, err := node.Subscribe(ctx, "payments", func(context.Context, *pubsub.Message) error {
		return errors.New("database unavailable")
	})
	if err != nil {
		panic(err)
	}
	for i := range 2 {
		ack, err := node.Publish(ctx, "payments", fmt.Appendf(nil, "payment-%d", i))
		if err != nil {
			panic(err)
		}
		fmt.Printf("payment-%d: %s, delivered=%d, failure: %s\n", i, ack.Status, ack.Delivered, ack.Failures[0].Status)
	}
	<-sub.Done()
	fmt.Println("evicted:", errors.Is(sub.Err(), pubsub.ErrEvicted))
	// Output:
	// payment-0: accepted, delivered=0, failure: handler-error
	// payment-1: accepted, delivered=0, failure: handler-error
	// evicted: true
}

// Unsubscribe does not wait for a handler call already running (the
// handler may be the caller). A handler that writes to a file, a database
// or a channel owned by the caller is done with it once Stopped closes:
// wait on it, with a deadline, before closing what the handler uses.
func ExampleSubscription_Stopped() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx)
	defer stop()

	out := make(chan string, 16) // the resource the handler uses
	sub, err := node.Subscribe(ctx, "audit", func(_ context.Context, m *pubsub.Message) error {
		out <- string(m.Data)
		return nil
	})
	if err != nil {
		panic(err)
	}
	if _, err := node.Publish(ctx, "audit", []byte("login")); err != nil {
		panic(err)
	}
	if err := sub.Unsubscribe(ctx); err != nil {
		panic(err)
	}
	select {
	case <-sub.Stopped():
		close(out) // no handler call can send on it any more
	case <-ctx.Done():
		panic("the handler did not return in time")
	}
	for s := range out {
		fmt.Println("audited:", s)
	}
	// Output:
	// audited: login
}
