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

// The examples run against an embedded NATS server so that they need no
// network; a real program connects to its existing NATS instead. They use
// short heartbeats only to run fast.

// Join a cluster over an existing NATS connection. A lone node is a cluster
// of one: it owns every topic.
func ExampleJoin() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	defer nc.Close() // the node never closes the connection it was given

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, err := pubsub.Join(ctx, nc,
		pubsub.WithNodeID("orders-1"),
		pubsub.WithPrefix("example"), // subjects example.members and example.node.orders-1
		pubsub.WithHeartbeatInterval(50*time.Millisecond),
		pubsub.WithMemberTimeout(500*time.Millisecond),
	)
	if err != nil {
		panic(err)
	}
	defer func() {
		// Close gets a ctx of its own: the one Join used may have ended.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = node.Close(ctx) // announces the leave; peers re-own its topics at once
	}()

	fmt.Println("node:", node.ID())
	fmt.Println("members:", len(node.Members()))
	owner, _ := node.OwnerOf("orders")
	fmt.Println("owner of orders:", owner.ID)
	// Output:
	// node: orders-1
	// members: 1
	// owner of orders: orders-1
}

// Subscribe returns once the topic's owner recorded the subscription, so a
// publish made afterwards always reaches it. The ack of a publish arrives
// once every subscriber the owner knew has handled the message.
func ExampleNode_Subscribe() {
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
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)

	sub, err := node.Subscribe(ctx, "greetings", func(ctx context.Context, m *pubsub.Message) error {
		fmt.Printf("received on %s: %s\n", m.Topic, m.Data)
		return nil // an error would count as a HandlerError failure in the ack
	})
	if err != nil {
		panic(err)
	}

	ack, err := node.Publish(ctx, "greetings", []byte("hello"))
	if err != nil {
		panic(err) // the ack is Rejected; ack.Reason says why
	}
	fmt.Printf("%s: delivered=%d failures=%d\n", ack.Status, ack.Delivered, len(ack.Failures))

	if err := sub.Unsubscribe(ctx); err != nil {
		panic(err)
	}
	<-sub.Done()
	fmt.Println("subscription ended, err:", sub.Err())
	// Output:
	// received on greetings: hello
	// accepted: delivered=1 failures=0
	// subscription ended, err: <nil>
}

// PublishBatch sends several messages to the topic's owner in one request;
// every subscriber receives them in order, and one ack covers the batch.
func ExampleNode_PublishBatch() {
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
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)

	for _, name := range []string{"billing", "shipping"} {
		_, err := node.Subscribe(ctx, "orders", func(ctx context.Context, m *pubsub.Message) error {
			if name == "shipping" && string(m.Data) == "order-2" {
				return errors.New("out of stock") // stops this batch for this subscriber
			}
			return nil
		})
		if err != nil {
			panic(err)
		}
	}

	batch := [][]byte{[]byte("order-1"), []byte("order-2"), []byte("order-3")}
	ack, err := node.PublishBatch(ctx, "orders", batch)
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s: messages=%d delivered=%d\n", ack.Status, ack.Messages, ack.Delivered)
	for _, f := range ack.Failures {
		fmt.Println("failed:", f.Status)
	}
	// Output:
	// accepted: messages=3 delivered=1
	// failed: handler-error
}

// A rejected publish returns an error that matches the sentinel of its
// Reason with errors.Is, so callers branch on either.
func ExampleReason_Err() {
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
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)

	ack, err := node.Publish(ctx, "no spaces allowed", []byte("x"))
	fmt.Println("status:", ack.Status)
	fmt.Println("reason:", ack.Reason)
	fmt.Println("errors.Is(err, ErrInvalidTopic):", errors.Is(err, pubsub.ErrInvalidTopic))
	fmt.Println("errors.Is(err, ack.Reason.Err()):", errors.Is(err, ack.Reason.Err()))

	switch {
	case errors.Is(err, pubsub.ErrInvalidTopic), errors.Is(err, pubsub.ErrTooLarge):
		fmt.Println("caller's bug: do not retry")
	case errors.Is(err, pubsub.ErrTopicUnavailable), errors.Is(err, pubsub.ErrTimeout):
		fmt.Println("transient: may retry (after ErrTimeout the message may have been delivered)")
	}
	// Output:
	// status: rejected
	// reason: invalid-topic
	// errors.Is(err, ErrInvalidTopic): true
	// errors.Is(err, ack.Reason.Err()): true
	// caller's bug: do not retry
}

// A BatchingProducer batches single messages for a service: Produce never
// blocks, and each message's future completes with its batch's ack.
func ExampleBatchingProducer() {
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
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)

	received := make(chan string, 100)
	if _, err := node.Subscribe(ctx, "telemetry", func(_ context.Context, m *pubsub.Message) error {
		received <- string(m.Data)
		return nil
	}); err != nil {
		panic(err)
	}
	p, err := pubsub.NewBatchingProducer(node, "telemetry", pubsub.ProducerConfig{
		Linger:         5 * time.Millisecond,
		OnPublishError: func(attempt int, err error) pubsub.ErrorDecision { return pubsub.RetryBatch(50 * time.Millisecond) },
	})
	if err != nil {
		panic(err)
	}
	var futures []*pubsub.Produced
	for i := 0; i < 3; i++ {
		futures = append(futures, p.Produce(ctx, []byte(fmt.Sprintf("reading %d", i))))
	}
	for _, f := range futures {
		ack, err := f.Wait(ctx)
		fmt.Println(ack.Status, ack.Delivered, err)
	}
	if err := p.Close(ctx); err != nil {
		panic(err)
	}
	for i := 0; i < 3; i++ {
		fmt.Println(<-received)
	}
	// Output:
	// accepted 1 <nil>
	// accepted 1 <nil>
	// accepted 1 <nil>
	// reading 0
	// reading 1
	// reading 2
}

// Every decision of the library is an event. A listener runs on its own
// goroutine; a slow one loses events (reported as EventsDropped) and never
// slows publishing.
func ExampleEventStream_Subscribe() {
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
	node, err := pubsub.Join(ctx, nc, pubsub.WithNodeID("n1"),
		pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)

	accepted := make(chan pubsub.PublishAccepted, 1)
	stop := node.Events().Subscribe(func(e pubsub.Event) {
		if a, ok := e.(pubsub.PublishAccepted); ok {
			accepted <- a
		}
	})
	defer stop()
	if _, err := node.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error { return nil }); err != nil {
		panic(err)
	}
	if _, err := node.PublishBatch(ctx, "orders", [][]byte{[]byte("a"), []byte("b")}); err != nil {
		panic(err)
	}
	a := <-accepted
	fmt.Printf("%s accepted %d messages on %q: %d delivered, %d failed\n", a.Node, a.Messages, a.Topic, a.Delivered, a.Failed)
	// Output:
	// n1 accepted 2 messages on "orders": 1 delivered, 0 failed
}

// Under KeepMajority a node that loses sight of most of the cluster stops
// serving the topics it owns instead of accepting publishes its subscribers
// elsewhere would never see. A lone node is its own majority. A connection
// closed underneath a node stops it, with a NodeStopped event.
func ExampleWithPartitionPolicy() {
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
		pubsub.WithPartitionPolicy(pubsub.KeepMajority),
		pubsub.WithMaxMembers(64), // a cap on the view: forged heartbeats cannot grow it past this
		pubsub.WithHeartbeatInterval(50*time.Millisecond),
		pubsub.WithMemberTimeout(500*time.Millisecond),
	)
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	stopped := make(chan pubsub.NodeStopped, 1)
	defer node.Events().Subscribe(func(e pubsub.Event) {
		if s, ok := e.(pubsub.NodeStopped); ok {
			stopped <- s
		}
	})()

	ack, err := node.Publish(ctx, "orders", []byte("o-1"))
	fmt.Println(ack.Status, err)

	nc.Close() // the application closed the connection the node was using
	s := <-stopped
	fmt.Println("stopped:", errors.Is(s.Err, pubsub.ErrClosed))
	_, err = node.Publish(ctx, "orders", []byte("o-2"))
	fmt.Println(errors.Is(err, pubsub.ErrClosed))
	// Output:
	// accepted <nil>
	// stopped: true
	// true
}
