package pubsub

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Found by review: topicActor.publish recorded a producer's batch as
// accepted (its producer mark) before it reserved room in the owner's
// in-flight budget. A batch then refused for the budget (OVERLOADED, which
// its publisher retries) still counted as accepted, so the producer's next batch, pipelined behind it, is not
// held back (ORDER_WAIT) while the refused one waits for its retry: it is
// served first, and the refused batch, served on its retry, reaches the
// subscriber after it and is dropped there as OutOfOrder. Nothing failed:
// the budget refusal is the owner's back-pressure, meant to be retried.
//
// The test drives the owner's actor as a pipelined producer's attempts
// reach it: batch 1 served; batch 2 refused for the budget; budget freed;
// batch 3 (previous: 2, not settled at the producer) arrives before batch
// 2's retry; then batch 2's retry (and batch 3 again if it was held back,
// as the publishing node does once 2 settled).
func TestBudgetRefusedBatchDoesNotLetTheNextOvertakeIt(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(3*time.Second), WithSubscriberTimeout(2*time.Second))
	topic := ownedTopics(pub, "owner", "review-budget-order", 1)[0]
	var mu sync.Mutex
	var got []string
	_, err := pub.Subscribe(t.Context(), topic, func(_ context.Context, m *Message) error {
		mu.Lock()
		got = append(got, string(m.Data))
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		ready := false
		onActorWait(owner, topic, func(a *topicActor) {
			_, code := a.check()
			ready = code == wire.Reply_OK && len(a.nodes) == 1
		})
		return ready
	}, 10*time.Second, 5*time.Millisecond, "the owner serves the topic with the subscriber")

	const producer = "review-producer"
	publish := func(batch, prev, settled uint64, data string) ownerAnswer {
		ch := make(chan ownerAnswer, 1)
		owner.owner.onActor(topic, false, func(a *topicActor) {
			a.publish(payload{msgs: msgBatch{data: [][]byte{[]byte(data)}}, publisher: pub.self.ID, level: AckDelivered,
				origin: batchOrigin{producer: producer, seq: batch << 16, prev: prev, settled: settled}},
				func(ans ownerAnswer) { ch <- ans })
		})
		select {
		case ans := <-ch:
			return ans
		case <-time.After(10 * time.Second):
			t.Fatalf("batch %d not answered", batch)
			return ownerAnswer{}
		}
	}

	first := publish(1, 0, 0, "b1")
	require.Equal(t, wire.Reply_OK, first.code)
	require.Equal(t, 1, first.ack.Delivered)

	// Another batch holds the whole (lowered) budget: batch 2 is refused.
	require.Eventually(t, func() bool { return owner.owner.inflight.Load() == 0 }, 10*time.Second, time.Millisecond,
		"batch 1 settled at the owner")
	owner.owner.budget.Store(1)
	require.True(t, owner.owner.reserve(1<<10))
	second := publish(2, 1, 1, "b2")
	require.Equal(t, wire.Reply_OVERLOADED, second.code, "batch 2 refused for the budget")
	owner.owner.release(1 << 10)
	owner.owner.budget.Store(maxOwnerInflightBytes)

	// Batch 3 reaches the owner before batch 2's retry; batch 2 is not
	// settled at the producer (settled stays 1).
	third := publish(3, 2, 1, "b3")
	t.Logf("batch 3, its predecessor refused and not settled: %s", third.code)
	second = publish(2, 1, 1, "b2") // batch 2's retry
	require.Equal(t, wire.Reply_OK, second.code)
	if third.code == wire.Reply_ORDER_WAIT {
		third = publish(3, 2, 2, "b3") // batch 2 settled: the publisher retries 3
	}
	require.Equal(t, wire.Reply_OK, third.code)

	assert.Empty(t, second.ack.Failures, "batch 2 (refused once for the budget, then accepted) failed at its subscriber")
	assert.Equal(t, 1, second.ack.Delivered, "batch 2 delivered")
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= 2
	}, 10*time.Second, 5*time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []string{"b1", "b2", "b3"}, got, "the subscriber's messages, in the producer's order")
}
