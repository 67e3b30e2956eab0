package pubsub_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkProducerLocal measures deliveries per second through a
// BatchingProducer on one node with three local subscribers, 128-byte
// messages: publisher, owner and subscribers coincide, so nothing crosses
// NATS. Each run starts its own one-server, one-node cluster.
//
//   - default-burst: ProducerConfig{} (every default), b.N Produce calls in a
//     loop, then a wait for the last future: what users try first. Produce
//     calls past MaxQueueSize fail at once with ErrQueueFull; deliveries/s
//     counts the accepted messages only and %queue-full reports the rest.
//   - deep-burst: the same with MaxQueueSize b.N, so the whole burst queues
//     (the intake is a chain of fixed-size blocks: nothing is copied as it
//     grows).
//   - tuned-window/inflight=N: MaxInFlight N and at most 50 000 futures
//     outstanding, well below MaxQueueSize, so nothing is rejected.
//
// DESIGN.md's target: a burst of 1 M messages at least 6 M deliveries/s, and
// a deep queue at most 25% below the windowed producer:
//
//	go test -run '^$' -bench ProducerLocal -benchtime 1000000x .
func BenchmarkProducerLocal(b *testing.B) {
	data := make([]byte, 128)
	setup := func(b *testing.B, cfg pubsub.ProducerConfig) (*pubsub.BatchingProducer, *deliveries) {
		c := testcluster.New(b, 1, 1, fast...)
		c.WaitConverged(b, 10*time.Second)
		const topic = "bench-local"
		d := newDeliveries()
		for range 3 {
			subscribeBench(b, c.Nodes[0], topic, d)
		}
		return newBenchProducer(b, c.Nodes[0], topic, cfg), d
	}

	b.Run("default-burst", func(b *testing.B) {
		p, d := setup(b, pubsub.ProducerConfig{})
		b.ReportAllocs()
		produceBurst(b, p, []pubsub.Outgoing{{Data: data}}, d, 3)
	})
	b.Run("deep-burst", func(b *testing.B) {
		p, d := setup(b, pubsub.ProducerConfig{MaxQueueSize: b.N})
		b.ReportAllocs()
		produceBurst(b, p, []pubsub.Outgoing{{Data: data}}, d, 3)
	})
	for _, inFlight := range []int{1, 4} {
		b.Run("tuned-window/inflight="+strconv.Itoa(inFlight), func(b *testing.B) {
			p, d := setup(b, pubsub.ProducerConfig{MaxInFlight: inFlight})
			b.ReportAllocs()
			produceWindow(b, p, []pubsub.Outgoing{{Data: data}}, d, 3, 50_000)
		})
	}
}
