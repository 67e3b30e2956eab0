package pubsub_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkPublishRoundTrip compares one Publish round trip (publisher,
// owner and subscriber on three different nodes, each on its own server)
// with a raw NATS request/reply across servers, measured in the same run.
// The target is a median at most 3x the raw one:
//
//	go test -run '^$' -bench PublishRoundTrip -benchtime 2000x .
func BenchmarkPublishRoundTrip(b *testing.B) {
	c := testcluster.New(b, 3, 3, fast...)
	c.WaitConverged(b, 10*time.Second)
	ctx := context.Background()

	b.Run("raw-nats-request", func(b *testing.B) {
		responder := c.Connect(b, 1)
		sub, err := responder.Subscribe("bench.echo", func(m *nats.Msg) { _ = m.Respond(m.Data) })
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = sub.Unsubscribe() }()
		if err := c.Servers.WaitForInterest("bench.echo", 5*time.Second); err != nil {
			b.Fatal(err)
		}
		requester := c.Connect(b, 0)
		data := make([]byte, 128)
		lat := make([]time.Duration, 0, b.N)
		for b.Loop() {
			start := time.Now()
			if _, err := requester.Request("bench.echo", data, 5*time.Second); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		reportMedian(b, lat)
	})

	b.Run("pubsub-publish", func(b *testing.B) {
		var topic string
		for i := 0; ; i++ {
			topic = "bench-rt-" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
			if m, _ := c.Nodes[0].OwnerOf(topic); m.ID == c.Nodes[1].ID() {
				break
			}
		}
		if _, err := c.Nodes[2].Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil }); err != nil {
			b.Fatal(err)
		}
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
		reportMedian(b, lat)
	})
}

func reportMedian(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "median-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}
