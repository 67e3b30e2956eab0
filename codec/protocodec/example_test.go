package protocodec_test

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/codec/protocodec"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// A typed topic of a generated protobuf type: handlers get decoded
// messages, publishes take them. Any generated message type works the same
// way (here a well-known wrapper type, so the example needs no .proto).
func ExampleNew() {
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
	node, err := pubsub.Join(ctx, nc, pubsub.WithNodeID("n1"))
	if err != nil {
		panic(err)
	}
	defer node.Close(context.Background())

	greetings, err := pubsub.NewTopic(node, "greetings", protocodec.New[*wrapperspb.StringValue]())
	if err != nil {
		panic(err)
	}
	_, err = greetings.Subscribe(ctx, func(ctx context.Context, v *wrapperspb.StringValue, m *pubsub.Message) error {
		fmt.Printf("got %q (%d bytes on the wire)\n", v.GetValue(), len(m.Data))
		return nil
	})
	if err != nil {
		panic(err)
	}
	ack, err := greetings.Publish(ctx, wrapperspb.String("hello"))
	if err != nil {
		panic(err)
	}
	fmt.Println(ack.Status, ack.Delivered)
	// Output:
	// got "hello" (7 bytes on the wire)
	// accepted 1
}
