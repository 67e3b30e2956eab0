package pubsub

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A topic actor's queue of publishes from other nodes is bounded in bytes
// as well as in requests: 65 536 requests of up to a NATS message each
// would otherwise hold gigabytes. Past maxActorQueueBytes a request is
// refused (counted, NOT_READY) and its publisher retries; once the actor
// catches up every publish is served.
func TestActorQueueIsBoundedInBytes(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(10*time.Second), WithSubscriberTimeout(2*time.Second))
	topic := ownedTopics(pub, "owner", "bytes", 1)[0]
	release := make(chan struct{})
	owner.owner.onActor(topic, false, func(*topicActor) { <-release }) // the actor is busy
	const size, count = 900 << 10, 80                                  // 72 MB: past the 64 MiB bound
	data := make([]byte, size)
	errs := make(chan error, count)
	for range count {
		go func() {
			_, err := pub.Publish(t.Context(), topic, data)
			errs <- err
		}()
	}
	waitForTest(t, "requests refused past the byte bound", func() bool { return owner.Stats().RequestsRefused > 0 })
	assert.LessOrEqual(t, owner.owner.actor(topic).queuedBytes.Load(), int64(maxActorQueueBytes))
	close(release)
	for range count {
		require.NoError(t, <-errs, "a publish refused while the queue was full is retried and served")
	}
	assert.Zero(t, owner.owner.actor(topic).queuedBytes.Load(), "queued bytes left after the queue drained")
}

// A subscriber that appears twice among a batch's outcomes (a group
// member whose own share and a re-routed share both failed) takes one
// eviction strike for the batch, not two.
func TestOneStrikePerSubscriberPerBatch(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithEvictAfter(2))
	topic := ownedTopics(pub, "owner", "strike", 1)[0]
	s, err := pub.Subscribe(t.Context(), topic, func(context.Context, *Message) error { return nil }, WithGroup("workers"))
	require.NoError(t, err)
	fails := make(chan int, 1)
	owner.owner.onActor(topic, false, func(a *topicActor) {
		a.account([]subscriberOutcome{{id: s.ID(), status: MailboxFull}, {id: s.ID(), status: Timeout}})
		fails <- a.fails[s.ID()]
	})
	assert.Equal(t, 1, <-fails, "strikes for one batch")
	select {
	case <-s.Done():
		t.Fatalf("evicted after one batch with EvictAfter 2: %v", s.Err())
	default:
	}
}
