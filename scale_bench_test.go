package pubsub_test

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// BenchmarkScale subscribes 10 000 topics x 10 subscribers over 3 nodes in
// one process and reports the heap bytes per subscription (both sides) and
// the goroutines they hold; then it crashes one node and reports how long
// after the crash every topic it owned accepted a publish that reached every
// live subscriber. Run it once:
//
//	go test -run '^$' -bench Scale -benchtime 1x -timeout 20m .
func BenchmarkScale(b *testing.B) {
	const topics, perTopic = 10_000, 10
	const memberTimeout = time.Second
	for b.Loop() {
		c := testcluster.New(b, 3, 3, pubsub.WithHeartbeatInterval(100*time.Millisecond),
			pubsub.WithMemberTimeout(memberTimeout), pubsub.WithMetricsInterval(0))
		c.WaitConverged(b, 10*time.Second)
		ctx := context.Background()
		handler := func(context.Context, *pubsub.Message) error { return nil }

		before := heapInUse()
		goroutinesBefore := runtime.NumGoroutine()
		var wg sync.WaitGroup
		work := make(chan int)
		for w := 0; w < 32; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range work {
					topic := fmt.Sprintf("scale-%d", i/perTopic)
					if _, err := c.Nodes[i%3].Subscribe(ctx, topic, handler); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		start := time.Now()
		for i := 0; i < topics*perTopic; i++ {
			work <- i
		}
		close(work)
		wg.Wait()
		subscribeTime := time.Since(start)
		after := heapInUse()
		b.ReportMetric(float64(after-before)/float64(topics*perTopic), "heap-B/subscription")
		b.ReportMetric(float64(runtime.NumGoroutine()-goroutinesBefore), "goroutines-held")
		b.ReportMetric(float64(topics*perTopic)/subscribeTime.Seconds(), "subscribes/s")

		// Crash node 0; every topic it owned must serve the survivors again.
		var owned []string
		for t := 0; t < topics; t++ {
			topic := fmt.Sprintf("scale-%d", t)
			if m, _ := c.Nodes[0].OwnerOf(topic); m.ID == c.Nodes[0].ID() {
				owned = append(owned, topic)
			}
		}
		liveSubs := func(topic string) int { // subscriber i of the run is on node i%3
			var t, n int
			fmt.Sscanf(topic, "scale-%d", &t)
			for i := t * perTopic; i < (t+1)*perTopic; i++ {
				if i%3 != 0 {
					n++
				}
			}
			return n
		}
		crashed := time.Now()
		c.Crash(0)
		var slowest atomic.Int64
		topicsCh := make(chan string)
		for w := 0; w < 32; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for topic := range topicsCh {
					for {
						ack, err := c.Nodes[1+len(topic)%2].Publish(ctx, topic, []byte("x"))
						if err == nil && ack.Delivered == liveSubs(topic) && len(ack.Failures) == 0 {
							break
						}
						if time.Since(crashed) > time.Minute {
							b.Errorf("topic %s not served a minute after the crash: %+v %v", topic, ack, err)
							break
						}
					}
					d := int64(time.Since(crashed))
					for cur := slowest.Load(); d > cur && !slowest.CompareAndSwap(cur, d); cur = slowest.Load() {
					}
				}
			}()
		}
		for _, t := range owned {
			topicsCh <- t
		}
		close(topicsCh)
		wg.Wait()
		b.ReportMetric(time.Duration(slowest.Load()).Seconds(), "s-until-all-moved-topics-served")
		b.Logf("%d topics moved; MemberTimeout %v; subscribe phase %v", len(owned), memberTimeout, subscribeTime)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
