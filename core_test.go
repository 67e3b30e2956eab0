package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

func TestPublishReachesEverySubscriberOnce(t *testing.T) {
	c := newCluster(t, 3, 3)
	rec := newRecorder()
	const topic = "orders"
	const subs = 20
	for i := 0; i < subs; i++ {
		subscribe(t, c.Nodes[i%3], topic, rec.handler)
	}
	ctx := ctxT(t)
	for i := 0; i < 100; i++ {
		ack, err := c.Nodes[i%3].Publish(ctx, topic, msg(i))
		mustAccept(t, ack, err, subs)
	}
	if got := rec.total(); got != 100*subs {
		t.Fatalf("deliveries = %d, want %d", got, 100*subs)
	}
	for i := 0; i < 10; i++ {
		batch := make([][]byte, 10)
		for j := range batch {
			batch[j] = msg(100 + i*10 + j)
		}
		ack, err := c.Nodes[(i+1)%3].PublishBatch(ctx, topic, batch)
		mustAccept(t, ack, err, subs)
		if ack.Messages != 10 {
			t.Fatalf("ack.Messages = %d, want 10", ack.Messages)
		}
	}
	if got := rec.total(); got != 200*subs {
		t.Fatalf("deliveries = %d, want %d", got, 200*subs)
	}
	// Exactly once and in order, per subscriber.
	for id, got := range rec.got {
		if len(got) != 200 {
			t.Fatalf("%s got %d messages, want 200", id, len(got))
		}
		for i, m := range got {
			if m != string(msg(i)) {
				t.Fatalf("%s message %d = %s, want %s", id, i, m, msg(i))
			}
		}
	}
	if len(rec.got) != subs {
		t.Fatalf("%d subscribers received, want %d", len(rec.got), subs)
	}
}

func TestPublishRightAfterSubscribeArrives(t *testing.T) {
	c := newCluster(t, 3, 3)
	ctx := ctxT(t)
	for i := 0; i < 30; i++ {
		topic := fmt.Sprintf("fresh-%d", i)
		rec := newRecorder()
		s := subscribe(t, c.Nodes[1], topic, rec.handler)
		ack, err := c.Nodes[2].Publish(ctx, topic, []byte("hello"))
		mustAccept(t, ack, err, 1)
		if got := rec.of(s.ID()); len(got) != 1 || got[0] != "hello" {
			t.Fatalf("round %d: subscriber got %q, want [hello]", i, got)
		}
	}
}

var _ = testcluster.WaitFor
var _ = time.Second
