package pubsub

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Early-ack publishes that queue up behind a busy topic actor are served as
// one batch (a run), and each call still gets its own ack counting its own
// messages. TestAckAcceptedAnswersEachPublishOfARun checks the answers
// under load but cannot tell whether runs formed; here they must.
func TestAckAcceptedQueuedPublishesAreServedAsOneRun(t *testing.T) {
	owner, pub := ownerAndPublisher(t)
	topic := ownedTopics(pub, "owner", "run", 1)[0]
	var got atomic.Int64
	_, err := pub.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		got.Add(1)
		return nil
	})
	require.NoError(t, err)

	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	owner.owner.onActor(topic, false, func(*topicActor) { <-release }) // the actor is busy
	before := owner.Stats().Deliveries

	const calls = 5
	var wg sync.WaitGroup
	for g := 1; g <= calls; g++ {
		wg.Go(func() {
			out := make([]Outgoing, g)
			for j := range out {
				out[j] = Outgoing{Data: fmt.Appendf(nil, "g%d-%d", g, j)}
			}
			ack, err := pub.PublishMessages(context.Background(), topic, out, WithAck(AckAccepted))
			assert.NoError(t, err)
			assert.Equal(t, g, ack.Messages, "an ack counts its own call's messages")
			assert.Equal(t, AckAccepted, ack.Level)
		})
	}
	held := owner.owner.actor(topic)
	waitForTest(t, "every publish queued at the owner", func() bool {
		held.early.mu.Lock()
		defer held.early.mu.Unlock()
		return len(held.early.reqs) == calls
	})
	free()
	wg.Wait()
	want := int64(calls * (calls + 1) / 2)
	waitForTest(t, "every message delivered", func() bool { return got.Load() == want })
	waitForTest(t, "the run's report", func() bool { return owner.Stats().Deliveries > before })
	assert.Equal(t, uint64(1), owner.Stats().Deliveries-before, "the queued publishes were not served as one batch")
	assert.Equal(t, want, got.Load())
}

// An AckNone publish that the publishing node's own topic actor refuses
// (here: the node does not own the topic, as right after ownership moved)
// is lost like one another node's actor refuses, and counted the same way
// (Stats.AckNoneRefused); it was dropped uncounted.
func TestAckNoneRefusedByTheLocalActorIsCounted(t *testing.T) {
	_, pub := ownerAndPublisher(t)
	topic := ownedTopics(pub, "owner", "local-refused", 1)[0]
	req := &publishRequest{
		wire:   &wire.PublishRequest{From: pub.selfRef(), Topic: topic, Count: 2, AckLevel: uint32(AckNone)},
		msgs:   msgBatch{data: [][]byte{[]byte("a"), []byte("b")}},
		origin: &batchOrigin{},
	}
	_, err := pub.askLocal(t.Context(), topic, req, func() {}, true)
	require.NoError(t, err, "queued on the local actor")
	waitForTest(t, "the refused messages counted", func() bool { return pub.Stats().AckNoneRefused == 2 })
}
