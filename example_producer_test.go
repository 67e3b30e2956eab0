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
