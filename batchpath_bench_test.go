package pubsub_test

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Batch-path baselines: the bytes a BatchingProducer moves, moved by raw
// NATS with no library code at all. They answer "how far can batching over
// these servers go on this machine?", an upper bound for the library's
// figures, the way raw-nats is the figure to beat.
const (
	batchPathMessages = 2000 // DefaultBatchSize
	batchPathEntry    = 130  // a 128-byte message packed: its bytes and a 2-byte length
	batchPathWindow   = 8    // batches outstanding: twice the producer's default MaxInFlight
)

// rawBatchPath moves b.N 128-byte messages the way the library moves them
// for a topic owned on server 1 with a producer on server 0, in batches of
// batchPathMessages, with at most batchPathWindow batches outstanding: a
// publisher connection on server 0 sends each batch to an "owner"
// connection on server 1, whose handler counts its own subscriber's share
// and republishes a batch to one connection on server 0 and one on server
// 2. For fan-out (group false) each of the three gets the whole batch; for
// a group (group true) each gets a third, as a keyless group's round robin
// shares it. With kept (fan-out only), the owner sends server 0's
// connection, the publisher's, a 2-byte count instead of the batch, as the
// library does for a publisher that kept a copy (kept.go). It reports
// deliveries/s and x-raw (rate/raw when raw > 0) and returns the rate. Its
// connections are closed when it returns.
func rawBatchPath(b *testing.B, c *testcluster.Cluster, prefix string, group, kept bool, raw float64) float64 {
	subject := prefix + "." + strconv.Itoa(b.N) + "." // a subject per run, as rawDeliver
	var conns []*nats.Conn
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	connect := func(server int) *nats.Conn {
		nc := c.Connect(b, server)
		conns = append(conns, nc)
		return nc
	}
	// A batch is done once its three shares arrived; window holds a token
	// per outstanding batch. Shares of different batches interleave, so a
	// token is returned per three arrivals, which bounds the batches in
	// flight all the same.
	window := make(chan struct{}, batchPathWindow)
	d := newDeliveries()
	var arrivals atomic.Int64
	arrived := func(msgs int) {
		if arrivals.Add(1)%3 == 0 {
			<-window
		}
		for range msgs {
			d.add()
		}
	}
	share := func(n int) int {
		if group {
			return n / 3
		}
		return n
	}
	for _, at := range []struct {
		server int
		name   string
	}{{0, "n0"}, {2, "n2"}} {
		rawSubscribe(b, connect(at.server), subject+at.name, "", func(m *nats.Msg) {
			if len(m.Data) == 2 { // a count: the publisher holds the batch
				arrived(int(m.Data[0]) | int(m.Data[1])<<8)
				return
			}
			arrived(len(m.Data) / batchPathEntry)
		})
	}
	owner := connect(1)
	rawSubscribe(b, owner, subject+"owner", "", func(m *nats.Msg) {
		n := len(m.Data) / batchPathEntry
		third := share(n) * batchPathEntry
		toPublisher := m.Data[:third]
		if kept {
			toPublisher = []byte{byte(n), byte(n >> 8)}
		}
		if err := owner.Publish(subject+"n0", toPublisher); err != nil {
			b.Error(err)
		}
		if err := owner.Publish(subject+"n2", m.Data[len(m.Data)-third:]); err != nil {
			b.Error(err)
		}
		if group {
			n -= 2 * share(n) // the owner's own member: the rest
		}
		arrived(n)
	})
	s0, s1 := c.Servers.Servers[0].GlobalAccount(), c.Servers.Servers[1].GlobalAccount()
	testcluster.WaitFor(b, 5*time.Second, func() bool {
		return s0.Interest(subject+"owner") == 1 && s1.Interest(subject+"n0") == 1 && s1.Interest(subject+"n2") == 1
	}, "the servers do not know the batch path's subscriptions")

	pub := connect(0)
	batch := make([]byte, batchPathMessages*batchPathEntry)
	b.ResetTimer()
	for left := b.N; left > 0; left -= batchPathMessages {
		window <- struct{}{}
		if err := pub.Publish(subject+"owner", batch[:min(left, batchPathMessages)*batchPathEntry]); err != nil {
			b.Fatal(err)
		}
	}
	if err := pub.Flush(); err != nil {
		b.Fatal(err)
	}
	want := int64(b.N)
	if !group {
		want *= 3
	}
	d.wait(b, want)
	rate := float64(want) / b.Elapsed().Seconds()
	b.StopTimer()
	b.ReportMetric(rate, "deliveries/s")
	reportRatio(b, rate, raw)
	return rate
}
