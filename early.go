package pubsub

import (
	"sync"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Publishes nobody waits on the delivery of (AckAccepted, AckNone) arrive
// one small batch at a time from a publishing loop: served one by one, each
// costs the owner a batch (a delivery and a report per subscriber node).
// The inbox queues them per topic, and the actor serves each run of
// consecutive ones from one publisher as a single batch.

// earlyQueue holds a topic's early-ack publishes until its actor serves
// them; the inbox goroutine and the actor share it under mu.
type earlyQueue struct {
	mu        sync.Mutex
	reqs      []earlyRequest
	bytes     int  // packed bytes held in reqs
	scheduled bool // an actor task will take reqs
}

type earlyRequest struct {
	msgs  payload
	reply string
}

// publishEarly queues msgs for topic's actor, and reports false when the
// queue is full (the request is then refused like any other).
func (n *Node) publishEarly(topic string, msgs payload, reply string) bool {
	_, ok := n.queueEarly(topic, msgs, reply, false)
	return ok
}

// publishBehindEarly queues a publish that waits for its delivery behind
// the early-ack publishes the topic's actor has not served yet, and reports
// false (queued) when there are none: the actor then takes it as any
// request. Served before them, it could reach the subscribers ahead of a
// publish its publisher made before it, and be dropped there as late.
func (n *Node) publishBehindEarly(topic string, msgs payload, reply string) (queued, ok bool) {
	return n.queueEarly(topic, msgs, reply, true)
}

// queueEarly is publishEarly; with behind, it queues only behind requests
// not served yet.
func (n *Node) queueEarly(topic string, msgs payload, reply string, behind bool) (queued, ok bool) {
	held := n.owner.actor(topic)
	q := &held.early
	q.mu.Lock()
	if behind && !q.scheduled {
		q.mu.Unlock()
		return false, true
	}
	if len(q.reqs) >= maxActorQueue || q.bytes+len(msgs.packed) > maxActorQueueBytes {
		q.mu.Unlock()
		return true, false
	}
	q.reqs = append(q.reqs, earlyRequest{msgs, reply})
	q.bytes += len(msgs.packed)
	if q.scheduled {
		q.mu.Unlock()
		return true, true
	}
	q.scheduled = true
	q.mu.Unlock()
	n.owner.onActorOf(held, false, func(a *topicActor) {
		q.mu.Lock()
		reqs := q.reqs
		q.reqs, q.bytes, q.scheduled = nil, 0, false
		q.mu.Unlock()
		for _, run := range n.mergeEarly(topic, reqs, a.lastServed) {
			a.publish(run.msgs, run.answer)
		}
		n.owner.queued.Add(-int64(len(reqs))) // each came from the inbox (onPublishRequest)
	})
	return true, true
}

// earlyRun is one batch made of consecutive early-ack publishes.
type earlyRun struct {
	msgs   payload
	answer func(ownerAnswer)
}

// mergeEarly joins consecutive requests of one publisher (and producer)
// into one batch while it fits in a message; each request still gets its
// own answer. Only batches without keys or headers merge: a format 2
// batch's headers may refer to the message before.
//
// A run carries its highest number, so it merges only requests in the
// order of their numbers, and a request that comes late (numbered at or
// below one this actor served, served returns that, or one merged before
// it in this pass: it travelled another route during a server restart)
// goes alone, under its own number, which subscribers drop as late. Merged
// with a newer one it took that one's number and reached the subscribers
// after later messages (TestMergeEarlyKeepsALateRequestUnderItsOwnNumber).
func (n *Node) mergeEarly(topic string, reqs []earlyRequest, served func(producer string) uint64) []earlyRun {
	return n.mergeEarlyWithin(topic, reqs, n.MaxMessageSize(), served)
}

// mergeEarlyWithin is mergeEarly with runs of at most limit packed bytes.
func (n *Node) mergeEarlyWithin(topic string, reqs []earlyRequest, limit int, served func(producer string) uint64) []earlyRun {
	var runs []earlyRun
	var passTop map[string]uint64 // the highest number of each producer merged in this pass
	for i := 0; i < len(reqs); {
		first := reqs[i].msgs
		j, size := i+1, len(first.packed)
		producer, top := first.origin.producer, first.origin.seq
		late := producer != "" && (top <= served(producer) || top <= passTop[producer])
		for !late && j < len(reqs) && mergeable(first, reqs[j].msgs) && (producer == "" || reqs[j].msgs.origin.seq > top) &&
			size+len(reqs[j].msgs.packed) <= limit {
			size += len(reqs[j].msgs.packed)
			top = max(top, reqs[j].msgs.origin.seq)
			j++
		}
		if producer != "" && top > passTop[producer] {
			if passTop == nil {
				passTop = map[string]uint64{}
			}
			passTop[producer] = top
		}
		run := reqs[i:j]
		msgs := first
		if len(run) > 1 {
			packed := make([]byte, 0, size)
			msgs.count = 0
			for _, r := range run {
				packed = append(packed, r.msgs.packed...)
				msgs.count += r.msgs.count
				msgs.origin.seq = max(msgs.origin.seq, r.msgs.origin.seq)
			}
			msgs.packed = packed
			msgs.kept = mergedKept(run)
		}
		runs = append(runs, earlyRun{msgs: msgs, answer: func(ans ownerAnswer) {
			for _, r := range run { // reqs is the queue's, taken whole: nothing changes it
				each := ans
				each.ack.Messages = r.msgs.count
				n.answerPublish(topic, r.reply, r.msgs.count, each.wire())
			}
		}})
		i = j
	}
	return runs
}

// mergeable reports whether b can join a batch that starts with a.
func mergeable(a, b payload) bool {
	return a.level != AckDelivered && !a.withMeta && !b.withMeta && a.msgs.data == nil && b.msgs.data == nil &&
		a.publisher == b.publisher && a.origin.producer == b.origin.producer &&
		a.origin.prev == 0 && b.origin.prev == 0 && a.level == b.level && !a.wantIDs && !b.wantIDs
}

// mergedKept names the copies the publisher kept of a run's requests, one
// per request in order, when it kept one of each (it kept them apart, and
// a copy not named is never taken, so it would stay until it expired);
// else none.
func mergedKept(run []earlyRequest) keptRef {
	if len(run) > wire.MaxKeptCopies {
		return keptRef{}
	}
	k := keptRef{ids: make([]uint64, 0, len(run)), inc: run[0].msgs.kept.inc}
	for _, r := range run {
		if len(r.msgs.kept.ids) != 1 || r.msgs.kept.inc != k.inc {
			return keptRef{}
		}
		k.ids = append(k.ids, r.msgs.kept.ids[0])
	}
	return k
}
