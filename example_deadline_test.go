package pubsub_test

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// A Publish whose context has a deadline is answered by the owner just
// before it: the subscribers that ran the batch are counted, and one that
// has not reported yet (here a handler stuck on another node) is listed as
// Timeout, its outcome unknown. Its delivery goes on.
func ExampleNode_Publish() {
	srv, err := embedded.StartServer()
	if err != nil {
		panic(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var nodes []*pubsub.Node
	for _, id := range []string{"a", "b"} {
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			panic(err)
		}
		defer nc.Close()
		node, err := pubsub.Join(ctx, nc, pubsub.WithNodeID(id),
			pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(500*time.Millisecond))
		if err != nil {
			panic(err)
		}
		defer node.Close(ctx)
		nodes = append(nodes, node)
	}
	if err := nodes[0].WaitMembers(ctx, 2); err != nil {
		panic(err)
	}
	if err := nodes[1].WaitMembers(ctx, 2); err != nil {
		panic(err)
	}
	owner, other := nodes[0], nodes[1]
	if o, _ := owner.OwnerOf("orders"); o.ID != owner.ID() {
		owner, other = other, owner
	}

	_, err = owner.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error { return nil })
	if err != nil {
		panic(err)
	}
	stuck := make(chan struct{})
	defer close(stuck) // before the nodes close: the handler returns
	_, err = other.Subscribe(ctx, "orders", func(context.Context, *pubsub.Message) error {
		<-stuck
		return nil
	})
	if err != nil {
		panic(err)
	}

	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancelShort()
	ack, err := owner.Publish(short, "orders", []byte("order-1"))
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s: delivered=%d\n", ack.Status, ack.Delivered)
	for _, f := range ack.Failures {
		fmt.Println("not reported by the deadline:", f.Status)
	}
	fmt.Println("answered before the deadline:", short.Err() == nil)
	// Output:
	// accepted: delivered=1
	// not reported by the deadline: timeout
	// answered before the deadline: true
}
