package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// With BlockWhenFull a loop of Produce calls is back-pressured: Produce
// waits for room in a full queue instead of failing with ErrQueueFull, so
// a burst far larger than MaxQueueSize is published whole, at the
// cluster's pace. The loop's ctx bounds each wait.
func ExampleProducerConfig_blockWhenFull() {
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

	var handled atomic.Int64
	if _, err := node.Subscribe(ctx, "clicks", func(context.Context, *pubsub.Message) error {
		handled.Add(1)
		return nil
	}); err != nil {
		panic(err)
	}
	p, err := pubsub.NewBatchingProducer(node, "clicks", pubsub.ProducerConfig{
		MaxQueueSize:  100, // tiny, to show the wait: the burst is 100 times larger
		BlockWhenFull: true,
	})
	if err != nil {
		panic(err)
	}
	queueFull := 0
	var last *pubsub.Produced
	for i := 0; i < 10_000; i++ {
		last = p.Produce(ctx, []byte(fmt.Sprintf("click %d", i)))
		if _, err, done := last.Result(); done && errors.Is(err, pubsub.ErrQueueFull) {
			queueFull++
		}
	}
	ack, err := last.Wait(ctx)
	fmt.Println("last:", ack.Status, err)
	if err := p.Close(ctx); err != nil {
		panic(err)
	}
	fmt.Println("rejected as queue-full:", queueFull)
	fmt.Println("handled:", handled.Load())
	// Output:
	// last: accepted <nil>
	// rejected as queue-full: 0
	// handled: 10000
}

// Stats counts what became of a producer's messages, so a burst can be
// checked after Flush without keeping its futures.
func ExampleBatchingProducer_Stats() {
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
	if _, err := node.Subscribe(ctx, "audit", func(context.Context, *pubsub.Message) error { return nil }); err != nil {
		panic(err)
	}
	p, err := pubsub.NewBatchingProducer(node, "audit", pubsub.ProducerConfig{})
	if err != nil {
		panic(err)
	}
	defer p.Close(ctx)
	for i := 0; i < 1000; i++ {
		p.Produce(ctx, []byte(fmt.Sprintf("event %d", i))) // futures not kept
	}
	p.Produce(ctx, make([]byte, node.MaxMessageSize()+1)) // too large: refused at once
	if err := p.Flush(ctx); err != nil {
		panic(err)
	}
	st := p.Stats()
	fmt.Println("accepted:", st.Accepted)
	fmt.Println("rejected:", st.Rejected, st.ByReason)
	fmt.Println("pending:", st.Pending)
	// Output:
	// accepted: 1000
	// rejected: 1 map[too-large:1]
	// pending: 0
}

// WaitMembers waits for the view to hold the members a service needs
// before it starts; Join itself returns once the view is stable, whatever
// its size.
func ExampleNode_WaitMembers() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var conns []*nats.Conn // closed after their nodes
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	for range 2 {
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			panic(err)
		}
		conns = append(conns, nc)
	}
	join := func(nc *nats.Conn, id string) *pubsub.Node {
		node, err := pubsub.Join(ctx, nc, pubsub.WithNodeID(id),
			pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
		if err != nil {
			panic(err)
		}
		return node
	}
	first := join(conns[0], "first")
	second := make(chan *pubsub.Node, 1)
	go func() { second <- join(conns[1], "second") }() // another process, in a real deployment
	if err := first.WaitMembers(ctx, 2); err != nil {
		panic(err)
	}
	for _, m := range first.Members() {
		fmt.Println(m.ID)
	}
	for _, n := range []*pubsub.Node{<-second, first} {
		_ = n.Close(ctx)
	}
	// Output:
	// first
	// second
}
