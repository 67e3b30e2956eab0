package pubsub_test

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkEnvelope measures what keys and headers cost, in deliveries/s
// of 128-byte messages, plain and with a 40-byte key and two short headers
// each, in the same run on the same cluster:
//
//   - fanout: 3 servers, 3 nodes, one subscriber per node, the producer on
//     node 0 (two of three deliveries cross NATS);
//   - local: one node with three subscribers (nothing crosses NATS).
//
// Each path runs the default producer with a burst of Produce calls (what
// users try first; calls past MaxQueueSize fail with ErrQueueFull, and
// deliveries/s counts the accepted ones) and a tuned window (MaxInFlight 4,
// a bounded number of outstanding futures). keyed runs report x-plain, their
// rate over the plain run of the same path and pattern. allocs/op is per
// message. The targets: keyed fan-out at least 0.7 x plain, and no
// allocation per message on the local path either way:
//
//	go test -run '^$' -bench Envelope -benchtime 300000x -benchmem .
func BenchmarkEnvelope(b *testing.B) {
	data := make([]byte, 128)
	plain := pubsub.Outgoing{Data: data}
	keyed := pubsub.Outgoing{Data: data, Key: strings.Repeat("k", 40),
		Header: pubsub.Header{"tenant": {"acme"}, "content-type": {"application/json"}}}
	// keyed-distinct: every message in a run of 1024 has a header of its
	// own (a request ID), so a node decodes each one; equal headers in a
	// row share one decoded map.
	distinct := make([]pubsub.Outgoing, 1024)
	for i := range distinct {
		distinct[i] = pubsub.Outgoing{Data: data, Key: keyed.Key,
			Header: pubsub.Header{"tenant": {"acme"}, "request-id": {fmt.Sprintf("%016x", i)}}}
	}
	var run atomic.Int64
	for _, path := range []struct {
		name         string
		servers, pub int
	}{{"fanout", 3, 0}, {"local", 1, 0}} {
		b.Run(path.name, func(b *testing.B) {
			c := testcluster.New(b, path.servers, path.servers, fast...)
			c.WaitConverged(b, 10*time.Second)
			setup := func(b *testing.B, cfg pubsub.ProducerConfig) (*pubsub.BatchingProducer, *deliveries) {
				topic := benchTopic(c, "bench-envelope-", &run, 1%len(c.Nodes)) // fan-out: owned by n1, as in BenchmarkFanout
				d := newDeliveries()
				for i := range 3 {
					subscribeBench(b, c.Nodes[i%len(c.Nodes)], topic, d)
				}
				return newBenchProducer(b, c.Nodes[path.pub], topic, cfg), d
			}
			for _, pattern := range []struct {
				name string
				cfg  pubsub.ProducerConfig
				run  func(*testing.B, *pubsub.BatchingProducer, []pubsub.Outgoing, *deliveries) float64
			}{
				{"default-burst", pubsub.ProducerConfig{}, func(b *testing.B, p *pubsub.BatchingProducer, m []pubsub.Outgoing, d *deliveries) float64 {
					return produceBurst(b, p, m, d, 3)
				}},
				{"tuned-window", pubsub.ProducerConfig{MaxInFlight: 4}, func(b *testing.B, p *pubsub.BatchingProducer, m []pubsub.Outgoing, d *deliveries) float64 {
					return produceWindow(b, p, m, d, 3, 20_000)
				}},
			} {
				var plainRate float64
				b.Run(pattern.name+"/plain", func(b *testing.B) {
					p, d := setup(b, pattern.cfg)
					b.ReportAllocs()
					plainRate = pattern.run(b, p, []pubsub.Outgoing{plain}, d)
				})
				b.Run(pattern.name+"/keyed", func(b *testing.B) {
					p, d := setup(b, pattern.cfg)
					b.ReportAllocs()
					rate := pattern.run(b, p, []pubsub.Outgoing{keyed}, d)
					if plainRate > 0 {
						b.ReportMetric(rate/plainRate, "x-plain")
					}
				})
				b.Run(pattern.name+"/keyed-distinct", func(b *testing.B) {
					p, d := setup(b, pattern.cfg)
					b.ReportAllocs()
					rate := pattern.run(b, p, distinct, d)
					if plainRate > 0 {
						b.ReportMetric(rate/plainRate, "x-plain")
					}
				})
			}
		})
	}
}
