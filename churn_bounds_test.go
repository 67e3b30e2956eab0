package pubsub_test

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

func churnHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

func ownerSubscribers(n *pubsub.Node) int {
	total := 0
	for _, c := range n.Stats().Subscribers {
		total += c
	}
	return total
}

// A Subscribe whose ctx ends after its request reached the owner fails and
// leaves nothing on the subscriber's node; the owner must not keep the
// subscriber it recorded for it either.
func TestCancelledSubscribeLeavesNoSubscriberAtTheOwner(t *testing.T) {
	c := newCluster(t, 1, 2)
	owner, sub := c.Nodes[0], c.Nodes[1]
	// The owner's listener cancels the pending Subscribe once the owner
	// recorded it: the answer is then on its way back.
	var mu sync.Mutex
	cancels := map[string]context.CancelFunc{}
	stop := owner.Events().Subscribe(func(e pubsub.Event) {
		if a, ok := e.(pubsub.SubscriberAdded); ok {
			mu.Lock()
			if cancel := cancels[a.Topic]; cancel != nil {
				cancel()
			}
			mu.Unlock()
		}
	})
	defer stop()
	const topics = 300
	failed := 0
	heap0 := churnHeap()
	for i := range topics {
		topic := ownedBy(t, owner, fmt.Sprintf("cancelled-%d", i))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		mu.Lock()
		cancels[topic] = cancel
		mu.Unlock()
		s, err := sub.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil })
		cancel()
		mu.Lock()
		delete(cancels, topic)
		mu.Unlock()
		if err != nil {
			failed++
			continue
		}
		if err := s.Unsubscribe(ctxT(t)); err != nil {
			t.Fatalf("unsubscribe: %v", err)
		}
	}
	t.Logf("%d of %d Subscribes failed for their cancelled ctx; heap %+d KB", failed, topics, (int64(churnHeap())-int64(heap0))/1024)
	if failed == 0 {
		t.Skip("no Subscribe was cancelled in flight")
	}
	if got := sub.Stats().Subscriptions; got != 0 {
		t.Fatalf("subscriber node holds %d subscriptions, want 0", got)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return ownerSubscribers(owner) == 0 },
		"owner still records %d subscribers (%d topics owned) for %d failed Subscribes", ownerSubscribers(owner), owner.Stats().TopicsOwned, failed)
}
