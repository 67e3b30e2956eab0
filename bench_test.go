package pubsub_test

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkPublishRoundTrip compares one Publish round trip (publisher,
// owner and subscriber on three different nodes, each on its own server)
// with a raw NATS request/reply across servers (requester on server 0,
// responder on server 1), measured in the same run on the same servers.
// raw-nats-request runs first, with no node attached to the servers (the
// nodes join after it); pubsub-publish reports, beside its median and p99,
// their ratios to the raw ones (x-raw-median, x-raw-p99). The targets: a
// median at most 3x the raw one, a p99 at most 4x the raw p99:
//
//	go test -run '^$' -bench PublishRoundTrip -benchtime 5000x .
func BenchmarkPublishRoundTrip(b *testing.B) {
	c := testcluster.New(b, 3, 0) // servers only: nodes join after raw-nats-request
	ctx := context.Background()

	var rawMedian, rawP99 time.Duration
	b.Run("raw-nats-request", func(b *testing.B) {
		responder := c.Connect(b, 1)
		defer responder.Close()
		if _, err := responder.Subscribe("bench.echo", func(m *nats.Msg) { _ = m.Respond(m.Data) }); err != nil {
			b.Fatal(err)
		}
		if err := c.Servers.WaitForInterest("bench.echo", 5*time.Second); err != nil {
			b.Fatal(err)
		}
		requester := c.Connect(b, 0)
		defer requester.Close()
		data := make([]byte, 128)
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			start := time.Now()
			if _, err := requester.Request("bench.echo", data, 5*time.Second); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		rawMedian, rawP99 = reportMedian(b, lat)
	})

	for i := range 3 {
		c.AddNode(b, "n"+strconv.Itoa(i), i, fast...)
	}
	c.WaitConverged(b, 10*time.Second)

	b.Run("pubsub-publish", func(b *testing.B) {
		var topic string
		for i := 0; ; i++ {
			topic = "bench-rt-" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
			if m, _ := c.Nodes[0].OwnerOf(topic); m.ID == c.Nodes[1].ID() {
				break
			}
		}
		subscribeBench(b, c.Nodes[2], topic, newDeliveries()) // unsubscribed when the run ends
		data := make([]byte, 128)
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			start := time.Now()
			ack, err := c.Nodes[0].Publish(ctx, topic, data)
			if err != nil || ack.Delivered != 1 {
				b.Fatalf("ack %+v err %v", ack, err)
			}
			lat = append(lat, time.Since(start))
		}
		median, p99 := reportMedian(b, lat)
		if rawMedian > 0 && rawP99 > 0 {
			b.ReportMetric(float64(median)/float64(rawMedian), "x-raw-median")
			b.ReportMetric(float64(p99)/float64(rawP99), "x-raw-p99")
		}
	})
}

// reportMedian reports the median and the 99th percentile of lat, in
// microseconds, and returns them.
func reportMedian(b *testing.B, lat []time.Duration) (median, p99 time.Duration) {
	if len(lat) == 0 {
		return 0, 0
	}
	slices.Sort(lat)
	median, p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	b.ReportMetric(float64(median.Nanoseconds())/1e3, "median-µs")
	b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
	return median, p99
}
