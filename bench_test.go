package pubsub_test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkPublishRoundTrip compares one Publish round trip (publisher,
// owner and subscriber on three different nodes, each on its own server)
// with a raw NATS request/reply across servers (requester on server 0,
// responder on server 1), measured in the same run on the same servers.
// raw-nats-request runs first, with no node attached to the servers (the
// nodes join after it); pubsub-publish reports, beside its median and p99,
// their ratios to the raw ones (x-raw-median, x-raw-p99). The targets: a
// median at most 3x the raw one (1.5x with AckAccepted), a p99 at most 4x
// the raw p99.
//
// The subscriber-on-owner runs put the subscriber on the owner's node, so
// that the path is the raw one (publisher on server 0, owner on server 1)
// with nothing else moving: with the subscriber on a third node, an
// AckAccepted publish's answer, and the next publish, share the machine's
// cores with the delivery of the publish before, still on its way to the
// subscriber and its report back to the owner.
//
//	go test -run '^$' -bench PublishRoundTrip -benchtime 5000x .
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

	var run atomic.Int64
	data := make([]byte, 128)
	for _, layout := range []struct {
		suffix     string
		subscriber int // the node of the topic's one subscriber; the owner is node 1
	}{{"", 2}, {"/subscriber-on-owner", 1}} {
		topic := benchTopic(c, "bench-rt-", &run, 1)
		subscribeBench(b, c.Nodes[layout.subscriber], topic, newDeliveries())
		for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
			// pubsub-publish is AckDelivered, the default: its ack waits for
			// the subscriber; AckAccepted's for the owner only.
			name := "pubsub-publish"
			if level != pubsub.AckDelivered {
				name += "/ack=" + level.String()
			}
			b.Run(name+layout.suffix, func(b *testing.B) {
				msgs := []pubsub.Outgoing{{Data: data}}
				lat := make([]time.Duration, 0, b.N)
				for b.Loop() {
					start := time.Now()
					ack, err := c.Nodes[0].PublishMessages(ctx, topic, msgs, pubsub.WithAck(level))
					if err != nil || (level == pubsub.AckDelivered && ack.Delivered != 1) {
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
	}
}

// BenchmarkAckNone compares AckNone publishes, one call at a time from a
// node that does not own the topic (publisher on server 0, owner on server
// 1, subscriber on server 2), with raw NATS publishes of the same payloads
// from server 0 to a subscriber on server 2, in the same run, raw first with
// no node attached. It reports the calls' rate (calls/s) and the rate of
// deliveries until every message was delivered or refused (msgs/s,
// x-raw), checks the order of what arrived, and reports the share the
// owner refused: an AckNone publisher has no back-pressure from the owner,
// and past the topic actor's queue (65 536 requests or 64 MiB) the owner
// refuses, counts and logs them. The publisher merges the calls in its
// outbox, so they arrive in a few large batches; the subscription's mailbox
// still has room for one batch per call, should nothing merge. The target:
// at least 0.5x the raw publish rate, all delivered.
//
//	go test -run '^$' -bench AckNone -benchtime 200000x .
func BenchmarkAckNone(b *testing.B) {
	c := testcluster.New(b, 3, 0)
	data := make([]byte, 128)
	var raw float64
	b.Run("raw-nats-publish", func(b *testing.B) {
		sub := c.Connect(b, 2)
		defer sub.Close()
		subject := "bench.none." + strconv.Itoa(b.N)
		d := newDeliveries()
		if _, err := sub.Subscribe(subject, func(*nats.Msg) { d.add() }); err != nil {
			b.Fatal(err)
		}
		if err := c.Servers.WaitForInterest(subject, 5*time.Second); err != nil {
			b.Fatal(err)
		}
		pub := c.Connect(b, 0)
		defer pub.Close()
		b.ResetTimer()
		for range b.N {
			if err := pub.Publish(subject, data); err != nil {
				b.Fatal(err)
			}
		}
		d.wait(b, int64(b.N))
		raw = float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(raw, "msgs/s")
	})
	for i := range 3 {
		c.AddNode(b, "n"+strconv.Itoa(i), i, fast...)
	}
	c.WaitConverged(b, 10*time.Second)
	var run atomic.Int64
	b.Run("pubsub-ack=none", func(b *testing.B) {
		topic := benchTopic(c, "bench-none-", &run, 1)
		var mu sync.Mutex
		last, outOfOrder := -1, 0
		d := newDeliveries()
		s, err := c.Nodes[2].Subscribe(context.Background(), topic, func(_ context.Context, m *pubsub.Message) error {
			mu.Lock()
			if n, _ := strconv.Atoi(string(m.Data[:8])); n <= last {
				outOfOrder++
			} else {
				last = n
			}
			mu.Unlock()
			d.add()
			return nil
		}, pubsub.WithSubscriptionMailbox(b.N+1)) // room for one batch per call
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = s.Unsubscribe(context.Background()) }()
		msgs := make([][]pubsub.Outgoing, b.N)
		for i := range msgs {
			payload := make([]byte, 128)
			copy(payload, fmt.Sprintf("%08d", i))
			msgs[i] = []pubsub.Outgoing{{Data: payload}}
		}
		none := pubsub.WithAck(pubsub.AckNone)
		refused0 := c.Nodes[1].Stats().RequestsRefused
		b.ResetTimer()
		for i := range b.N {
			if _, err := c.Nodes[0].PublishMessages(context.Background(), topic, msgs[i], none); err != nil {
				b.Fatal(err)
			}
		}
		calls := float64(b.N) / b.Elapsed().Seconds()
		// Every message is delivered, or refused by the owner's full queue
		// (nothing tells an AckNone publisher: the owner counts it).
		refused := func() int64 { return int64(c.Nodes[1].Stats().RequestsRefused - refused0) }
		testcluster.WaitFor(b, time.Minute, func() bool { return d.got.Load()+refused() >= int64(b.N) },
			"%d of %d delivered, %d refused", d.got.Load(), b.N, refused())
		rate := float64(d.got.Load()) / b.Elapsed().Seconds()
		b.StopTimer()
		mu.Lock()
		defer mu.Unlock()
		if outOfOrder > 0 {
			b.Fatalf("%d messages out of order", outOfOrder)
		}
		b.ReportMetric(calls, "calls/s")
		b.ReportMetric(100*float64(refused())/float64(b.N), "%refused")
		b.ReportMetric(rate, "msgs/s")
		if raw > 0 {
			b.ReportMetric(rate/raw, "x-raw")
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
