package pubsub_test

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkGroup compares delivered messages per second to a consumer group
// through a BatchingProducer (3 nodes on a 3-server cluster, one member of
// group "workers" per node, 128-byte keyless messages) with a raw NATS core
// queue group doing the same work with one NATS message per logical message,
// measured in the same run on the same servers. Each message reaches exactly
// one member, so deliveries/s is the number of messages the group consumed
// per second.
//
// raw-nats-queue runs first, on the 3 servers with no node attached (the
// nodes join only after it): a queue group "workers" of 3 subscriber
// connections, one per server, and one publisher connection on server 0.
// (The publisher's server picks a member at random for each message, so
// two thirds of the messages cross a route.) raw-nats-batch-path follows,
// still with no node attached: a group's bytes moved by raw NATS with no
// library code (rawBatchPath). Then the nodes join and two library
// patterns run on a fresh topic each, reporting deliveries/s and
// x-raw, its ratio to the raw-nats-queue figure of the same run:
//
//   - default-burst: ProducerConfig{} (every default), b.N Produce calls in a
//     loop, then a wait for the last future: what users try first. Produce
//     calls past MaxQueueSize fail at once with ErrQueueFull; deliveries/s
//     counts the accepted messages only and %queue-full reports the rest.
//   - tuned-window: MaxInFlight 4 and at most 20 000 futures outstanding.
//   - keyed-burst, keyed-window: default-burst and tuned-window with one
//     of 64 keys on every message.
//
// DESIGN target: at least 3x the NATS queue group's deliveries/s, for a
// burst of 300 000 messages. Run with -count 1 (repeat the command) so that
// every ratio compares with the raw figure of its own run:
//
//	go test -run '^$' -bench Group -benchtime 300000x .
func BenchmarkGroup(b *testing.B) {
	c := testcluster.New(b, 3, 0) // servers only: nodes join after raw-nats-queue
	data := make([]byte, 128)

	var raw float64 // deliveries/s of the last raw-nats-queue run (the one at the full b.N with -count 1)
	b.Run("raw-nats-queue", func(b *testing.B) {
		raw = rawDeliver(b, c, "bench.group", "workers", data)
	})
	b.Run("raw-nats-batch-path", func(b *testing.B) {
		rawBatchPath(b, c, "bench.group.path", true, false, raw)
	})

	for i := range 3 {
		c.AddNode(b, "n"+strconv.Itoa(i), i, fast...)
	}
	c.WaitConverged(b, 10*time.Second)
	var run atomic.Int64 // a fresh topic for every run: no member of an earlier run
	setup := func(b *testing.B) (string, *deliveries) {
		topic := benchTopic(c, "bench-group-", &run, 1)
		d := newDeliveries()
		for _, n := range c.Nodes {
			subscribeBench(b, n, topic, d, pubsub.WithGroup("workers"))
		}
		return topic, d
	}

	// subs is 1 in both: each message is delivered once, to one member.
	b.Run("default-burst", func(b *testing.B) {
		topic, d := setup(b)
		p := newBenchProducer(b, c.Nodes[0], topic, pubsub.ProducerConfig{})
		reportRatio(b, produceBurst(b, p, []pubsub.Outgoing{{Data: data}}, d, 1), raw)
	})

	b.Run("tuned-window", func(b *testing.B) {
		topic, d := setup(b)
		p := newBenchProducer(b, c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 4})
		reportRatio(b, produceWindow(b, p, []pubsub.Outgoing{{Data: data}}, d, 1, 20_000), raw)
	})

	// keyed-burst and keyed-window are default-burst and tuned-window with
	// a key on every message (64 keys in turn): the batches reach the owner
	// with keys (format 2), and each member's node gets only its members'
	// messages.
	keyed := make([]pubsub.Outgoing, 64)
	for i := range keyed {
		keyed[i] = pubsub.Outgoing{Data: data, Key: "customer-" + strconv.Itoa(i)}
	}
	b.Run("keyed-burst", func(b *testing.B) {
		topic, d := setup(b)
		p := newBenchProducer(b, c.Nodes[0], topic, pubsub.ProducerConfig{})
		reportRatio(b, produceBurst(b, p, keyed, d, 1), raw)
	})
	b.Run("keyed-window", func(b *testing.B) {
		topic, d := setup(b)
		p := newBenchProducer(b, c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 4})
		reportRatio(b, produceWindow(b, p, keyed, d, 1, 20_000), raw)
	})
}
