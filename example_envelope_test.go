package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// exampleNode joins a lone node on an embedded server for the envelope
// examples; stop releases everything.
func exampleNode(ctx context.Context, opts ...pubsub.Option) (node *pubsub.Node, stop func()) {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		panic(err)
	}
	node, err = pubsub.Join(ctx, nc, append([]pubsub.Option{
		pubsub.WithHeartbeatInterval(50 * time.Millisecond), pubsub.WithMemberTimeout(500 * time.Millisecond)}, opts...)...)
	if err != nil {
		panic(err)
	}
	return node, func() {
		_ = node.Close(ctx)
		nc.Close()
		srv.Shutdown()
		srv.WaitForShutdown()
	}
}

// PublishMessages sends messages with a routing key and a header. A message
// published without a header arrives with a nil Header.
func ExampleNode_PublishMessages() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx)
	defer stop()

	_, err := node.Subscribe(ctx, "orders", func(ctx context.Context, m *pubsub.Message) error {
		fmt.Printf("%s key=%q tenant=%q header-nil=%v\n", m.Data, m.Key, m.Header.Get("tenant"), m.Header == nil)
		return nil
	})
	if err != nil {
		panic(err)
	}
	ack, err := node.PublishMessages(ctx, "orders", []pubsub.Outgoing{
		{Data: []byte("order-1"), Key: "customer-7", Header: pubsub.Header{"tenant": {"acme"}}},
		{Data: []byte("order-2")},
	})
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s: messages=%d delivered=%d\n", ack.Status, ack.Messages, ack.Delivered)

	// A header name with whitespace, ':' or a control character rejects
	// the whole batch.
	_, err = node.PublishMessages(ctx, "orders", []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"bad name": {"v"}}}})
	fmt.Println(err != nil)
	// Output:
	// order-1 key="customer-7" tenant="acme" header-nil=false
	// order-2 key="" tenant="" header-nil=true
	// accepted: messages=2 delivered=1
	// true
}

// A Topic is a typed view of one topic: values are encoded by its codec on
// the way out and decoded before the handler sees them. Publish, Subscribe
// and NewTypedProducer have the byte API's semantics and acks.
func ExampleTopic() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx)
	defer stop()

	type Order struct {
		ID    int    `json:"id"`
		Item  string `json:"item"`
		Count int    `json:"count"`
	}
	orders, err := pubsub.NewTopic(node, "orders", pubsub.JSONCodec[Order]())
	if err != nil {
		panic(err)
	}
	_, err = orders.Subscribe(ctx, func(ctx context.Context, o Order, m *pubsub.Message) error {
		fmt.Printf("order %d: %d x %s (key %q)\n", o.ID, o.Count, o.Item, m.Key)
		return nil
	})
	if err != nil {
		panic(err)
	}
	ack, err := orders.Publish(ctx, Order{ID: 1, Item: "widget", Count: 3})
	if err != nil {
		panic(err)
	}
	fmt.Println(ack.Status, ack.Delivered)

	producer, err := pubsub.NewTypedProducer(orders, pubsub.ProducerConfig{})
	if err != nil {
		panic(err)
	}
	defer producer.Close(ctx)
	f := producer.ProduceMessage(ctx, Order{ID: 2, Item: "gadget", Count: 1}, pubsub.Outgoing{Key: "customer-7"})
	if ack, err = f.Wait(ctx); err != nil {
		panic(err)
	}
	fmt.Println(ack.Status, ack.Delivered)
	// Output:
	// order 1: 3 x widget (key "")
	// accepted 1
	// order 2: 1 x gadget (key "customer-7")
	// accepted 1
}

// requestID is a Propagator carrying a request ID from the publisher's ctx
// to every handler's ctx, in the "request-id" header. A tracing adapter
// (OpenTelemetry's W3C trace context) plugs in the same way.
type requestID struct{}

type requestIDKey struct{}

func (requestID) Inject(ctx context.Context, h pubsub.Header) {
	if id, ok := ctx.Value(requestIDKey{}).(string); ok {
		h.Set("request-id", id)
	}
}

func (requestID) Extract(ctx context.Context, h pubsub.Header) context.Context {
	if id := h.Get("request-id"); id != "" {
		return context.WithValue(ctx, requestIDKey{}, id)
	}
	return ctx
}

// With a Propagator, each message carries context from the publishing call
// to its handlers.
func ExampleWithPropagator() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx, pubsub.WithPropagator(requestID{}))
	defer stop()

	_, err := node.Subscribe(ctx, "jobs", func(ctx context.Context, m *pubsub.Message) error {
		fmt.Printf("%s handled for request %v\n", m.Data, ctx.Value(requestIDKey{}))
		return nil
	})
	if err != nil {
		panic(err)
	}
	if _, err := node.Publish(context.WithValue(ctx, requestIDKey{}, "req-42"), "jobs", []byte("job-1")); err != nil {
		panic(err)
	}
	// Output:
	// job-1 handled for request req-42
}

// Subscribers that share a group name split the topic's messages: each
// message reaches one member of the group, the same member for one key,
// while a subscriber without a group gets every message. In the ack the
// group counts once.
func ExampleWithGroup() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx)
	defer stop()

	var mu sync.Mutex
	perMember := map[string]int{}
	for range 2 {
		_, err := node.Subscribe(ctx, "jobs", func(ctx context.Context, m *pubsub.Message) error {
			id, _ := pubsub.SubscriberFromContext(ctx)
			mu.Lock()
			perMember[id.Local]++
			mu.Unlock()
			return nil
		}, pubsub.WithGroup("workers"))
		if err != nil {
			panic(err)
		}
	}
	audit, err := node.Subscribe(ctx, "jobs", func(context.Context, *pubsub.Message) error { return nil })
	if err != nil {
		panic(err)
	}
	jobs := make([]pubsub.Outgoing, 10)
	for i := range jobs {
		jobs[i] = pubsub.Outgoing{Data: fmt.Appendf(nil, "job-%d", i)}
	}
	ack, err := node.PublishMessages(ctx, "jobs", jobs)
	if err != nil {
		panic(err)
	}
	mu.Lock()
	total := 0
	for _, n := range perMember {
		total += n
	}
	fmt.Printf("delivered=%d (the audit subscriber and the group); the group ran %d jobs over %d members\n", ack.Delivered, total, len(perMember))
	fmt.Println("audit group:", audit.Group() == "")
	mu.Unlock()
	// Output:
	// delivered=2 (the audit subscriber and the group); the group ran 10 jobs over 2 members
	// audit group: true
}

// WithAck chooses what a publish waits for: AckAccepted returns once the
// owner took the batch, while a subscriber may still be working on it.
func ExampleWithAck() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, stop := exampleNode(ctx)
	defer stop()

	release := make(chan struct{})
	done := make(chan struct{})
	_, err := node.Subscribe(ctx, "reports", func(context.Context, *pubsub.Message) error {
		<-release // a slow subscriber
		close(done)
		return nil
	})
	if err != nil {
		panic(err)
	}
	ack, err := node.PublishMessages(ctx, "reports", []pubsub.Outgoing{{Data: []byte("r1")}}, pubsub.WithAck(pubsub.AckAccepted))
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s at level %s: delivered=%d\n", ack.Status, ack.Level, ack.Delivered)
	close(release)
	<-done
	fmt.Println("handled after the publish returned")
	// Output:
	// accepted at level accepted: delivered=0
	// handled after the publish returned
}

// A client-only node publishes and subscribes but never owns a topic: an
// edge service or a tool joins with WithClientOnly, and every topic stays
// with the other members.
func ExampleWithClientOnly() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	join := func(opts ...pubsub.Option) (*pubsub.Node, func()) {
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			panic(err)
		}
		node, err := pubsub.Join(ctx, nc, append([]pubsub.Option{
			pubsub.WithHeartbeatInterval(50 * time.Millisecond), pubsub.WithMemberTimeout(500 * time.Millisecond)}, opts...)...)
		if err != nil {
			panic(err)
		}
		return node, func() { _ = node.Close(ctx); nc.Close() }
	}
	server, closeServer := join(pubsub.WithNodeID("server"))
	defer closeServer()
	edge, closeEdge := join(pubsub.WithNodeID("edge"), pubsub.WithClientOnly())
	defer closeEdge()

	if _, err := server.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error { return nil }); err != nil {
		panic(err)
	}
	owner, err := edge.OwnerOf("orders")
	if err != nil {
		panic(err)
	}
	ack, err := edge.Publish(ctx, "orders", []byte("from the edge"))
	if err != nil {
		panic(err)
	}
	fmt.Println("owner:", owner.ID)
	fmt.Println("delivered:", ack.Delivered)
	// Output:
	// owner: server
	// delivered: 1
}
