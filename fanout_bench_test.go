package pubsub_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkFanout compares delivered messages per second through a
// BatchingProducer (3 nodes on a 3-server cluster, one subscriber per node,
// 128-byte messages) with raw NATS core doing the same fan-out with one NATS
// message per logical message, measured in the same run. The target is at
// least 3x:
//
//	go test -run '^$' -bench Fanout -benchtime 200000x .
func BenchmarkFanout(b *testing.B) {
	c := testcluster.New(b, 3, 3, fast...)
	c.WaitConverged(b, 10*time.Second)
	data := make([]byte, 128)

	b.Run("raw-nats", func(b *testing.B) {
		var got atomic.Int64
		total := int64(3 * b.N)
		done := make(chan struct{})
		for i := 0; i < 3; i++ {
			nc := c.Connect(b, i)
			sub, err := nc.Subscribe("bench.fanout", func(*nats.Msg) {
				if got.Add(1) == total {
					close(done)
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			_ = sub.SetPendingLimits(-1, -1) // measure throughput, not drops
		}
		if err := c.Servers.WaitForInterest("bench.fanout", 5*time.Second); err != nil {
			b.Fatal(err)
		}
		pub := c.Connect(b, 0)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if err := pub.Publish("bench.fanout", data); err != nil {
				b.Fatal(err)
			}
		}
		if err := pub.Flush(); err != nil {
			b.Fatal(err)
		}
		waitDone(b, done, &got, total)
		b.ReportMetric(float64(total)/b.Elapsed().Seconds(), "deliveries/s")
	})

	b.Run("batching-producer", func(b *testing.B) {
		var got atomic.Int64
		total := int64(3 * b.N)
		done := make(chan struct{})
		topic := "bench-fanout"
		for _, n := range c.Nodes {
			if _, err := n.Subscribe(context.Background(), topic, func(context.Context, *pubsub.Message) error {
				if got.Add(1) == total {
					close(done)
				}
				return nil
			}); err != nil {
				b.Fatal(err)
			}
		}
		p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 4})
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		b.ResetTimer()
		// A service produces at the rate its publishes complete: keep at most
		// window messages outstanding, as a real caller bounded by its queue.
		const window = 20_000
		futures := make([]*pubsub.Produced, 0, b.N)
		for i := 0; i < b.N; i++ {
			futures = append(futures, p.Produce(ctx, data))
			if i >= window {
				if _, err := futures[i-window].Wait(ctx); err != nil {
					b.Fatal(err)
				}
			}
		}
		if err := p.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		waitDone(b, done, &got, total)
		b.ReportMetric(float64(total)/b.Elapsed().Seconds(), "deliveries/s")
		b.StopTimer()
		if err := p.Close(ctx); err != nil {
			b.Fatal(err)
		}
	})
}

func waitDone(b *testing.B, done chan struct{}, got *atomic.Int64, total int64) {
	select {
	case <-done:
	case <-time.After(time.Minute):
		b.Fatalf("only %d of %d deliveries arrived", got.Load(), total)
	}
}
