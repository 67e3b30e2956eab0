package pubsub

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// A topic actor's queue of publishes from other nodes is bounded in bytes
// as well as in requests: 65 536 requests of up to a NATS message each
// would otherwise hold gigabytes. Past maxActorQueueBytes a request is
// refused (counted, NOT_READY) and its publisher retries; once the actor
// catches up every publish is served.
func TestActorQueueIsBoundedInBytes(t *testing.T) {
	leakcheck.Parallel(t)
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

// A publish the owner's full queue refuses for the whole RequestTimeout
// fails with ErrQueueFull (ReasonQueueFull), saying the owner is
// overloaded, as one refused by the publisher's own actor does: before,
// a remote owner's refusal ended in ErrTopicUnavailable, as if no owner
// served the topic. Nothing of it was published: once the owner catches
// up, the publishes it queued are served and the refused ones were not.
func TestPublishRefusedByAFullRemoteQueueFailsWithErrQueueFull(t *testing.T) {
	leakcheck.Parallel(t)
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(500*time.Millisecond), WithSubscriberTimeout(10*time.Second))
	topic := ownedTopics(pub, "owner", "full", 1)[0]
	var delivered atomic.Int64
	_, err := pub.Subscribe(t.Context(), topic, func(context.Context, *Message) error { delivered.Add(1); return nil })
	require.NoError(t, err)
	release := make(chan struct{})
	owner.owner.onActor(topic, false, func(*topicActor) { <-release }) // the actor is busy
	const size, count = 900 << 10, 80                                  // 72 MB: past the 64 MiB bound
	data := make([]byte, size)
	type result struct {
		ack PublishAck
		err error
	}
	results := make(chan result, count)
	for range count {
		go func() {
			ack, err := pub.Publish(t.Context(), topic, data)
			results <- result{ack, err}
		}()
	}
	// The queued ones wait for the busy actor: the first to return was
	// refused.
	var first result
	select {
	case first = <-results:
	case <-time.After(20 * time.Second):
		t.Fatal("no publish returned while the owner's queue was full")
	}
	require.ErrorIs(t, first.err, ErrQueueFull)
	assert.NotErrorIs(t, first.err, ErrTopicUnavailable)
	assert.Equal(t, ReasonQueueFull, first.ack.Reason)
	assert.Contains(t, first.err.Error(), "queue for the topic is full")
	close(release)
	refused := 1
	for range count - 1 {
		r := <-results
		if r.err != nil {
			require.ErrorIs(t, r.err, ErrQueueFull)
			refused++
		}
	}
	t.Logf("%d of %d refused", refused, count)
	waitForTest(t, "the queued publishes delivered", func() bool { return delivered.Load() == int64(count-refused) })
	assert.Positive(t, owner.Stats().RequestsRefused)
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
		fails <- a.fails[s.ID()].n
	})
	assert.Equal(t, 1, <-fails, "strikes for one batch")
	select {
	case <-s.Done():
		t.Fatalf("evicted after one batch with EvictAfter 2: %v", s.Err())
	default:
	}
}

// MailboxFull evicts only once a subscriber's run of failures has lasted
// SubscriberTimeout: a burst of MailboxFull (a stalled route's backlog
// released at once) is EvictAfter failures in a row within milliseconds,
// and evicted a healthy subscriber. Other failures evict after EvictAfter
// in a row, as before.
func TestMailboxFullEvictsOnlyASubscriberThatStaysBehind(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithEvictAfter(3), WithSubscriberTimeout(time.Hour))
	topics := ownedTopics(pub, "owner", "behind", 2)
	handler := func(context.Context, *Message) error { return nil }
	full, err := pub.Subscribe(t.Context(), topics[0], handler)
	require.NoError(t, err)
	stuck, err := pub.Subscribe(t.Context(), topics[1], handler)
	require.NoError(t, err)
	account := func(topic string, id SubscriberID, s DeliveryStatus, times int) {
		done := make(chan struct{})
		owner.owner.onActor(topic, false, func(a *topicActor) {
			for range times {
				a.account([]subscriberOutcome{{id: id, status: s}})
			}
			close(done)
		})
		<-done
	}
	account(topics[0], full.ID(), MailboxFull, 50)
	select {
	case <-full.Done():
		t.Fatalf("evicted by a burst of MailboxFull: %v", full.Err())
	default:
	}
	// The same run, SubscriberTimeout later: it stayed behind.
	done := make(chan struct{})
	owner.owner.onActor(topics[0], false, func(a *topicActor) {
		run := a.fails[full.ID()]
		run.since = run.since.Add(-time.Hour)
		a.fails[full.ID()] = run
		close(done)
	})
	<-done
	account(topics[0], full.ID(), MailboxFull, 1)
	requireEvicted(t, full, "a subscriber whose mailbox stayed full for SubscriberTimeout")
	account(topics[1], stuck.ID(), Timeout, 3)
	requireEvicted(t, stuck, "three timeouts in a row")
}

func requireEvicted(t *testing.T, s *Subscription, what string) {
	t.Helper()
	select {
	case <-s.Done():
		require.ErrorIs(t, s.Err(), ErrEvicted)
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not evicted", what)
	}
}

// Topic actors reserving room in the owner's in-flight budget at once never
// hold more than it together: each reservation is added, then taken back
// when over, so exactly as many batches fit as the budget holds (the
// check-then-add it replaced let each actor running at once overshoot by a
// batch). A first batch fits whatever its size.
func TestInflightBudgetReservationsDoNotOvershootTogether(t *testing.T) {
	const size, fit, workers, tries = 1024, 10, 8, 200
	var o ownerSide
	o.budget.Store(size * fit)
	var wg sync.WaitGroup
	var admitted atomic.Int64
	start := make(chan struct{})
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range tries {
				if o.reserve(size) {
					admitted.Add(1)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	assert.Equal(t, int64(fit), admitted.Load(), "batches admitted")
	assert.Equal(t, int64(size*fit), o.inflightBytes.Load())
	assert.Equal(t, int64(fit), o.inflight.Load())

	for range fit {
		o.release(size)
	}
	assert.Zero(t, o.inflightBytes.Load())
	assert.True(t, o.reserve(size*fit*4), "a first batch over the budget fits alone")
	assert.False(t, o.reserve(1), "nothing beside it")
}

// At the owner's bound of subscriber records, a record is still taken when
// the actor holds it already (a repeated subscribe, or a sync offering it
// again) or when its node's records are of an earlier incarnation (add
// drops those first); any other is refused. Below the bound, any fits.
func TestRecordsAtTheBoundFitOnlyWhatMakesNoNetGrowth(t *testing.T) {
	n := &Node{}
	n.owner.maxRecords.Store(1)
	n.owner.records.Store(1)
	a := &topicActor{n: n, nodes: map[string]*nodeSubscribers{"x": {inc: 1, set: map[string]struct{}{"l1": {}}}}}
	assert.True(t, a.fits(SubscriberID{Node: "x", Local: "l1"}, 1), "held already")
	assert.False(t, a.fits(SubscriberID{Node: "x", Local: "l2"}, 1), "a new record of the same incarnation")
	assert.True(t, a.fits(SubscriberID{Node: "x", Local: "l2"}, 2), "a new incarnation: its node's old records go first")
	assert.False(t, a.fits(SubscriberID{Node: "y", Local: "l1"}, 1), "another node")
	n.owner.records.Store(0)
	assert.True(t, a.fits(SubscriberID{Node: "y", Local: "l1"}, 1), "room below the bound")
}
