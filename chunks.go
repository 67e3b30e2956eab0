package pubsub

import "github.com/clusterpubsub/pubsub/internal/wire"

// A batch too large for one request, on the publisher's side: the chunks it
// is cut into, and their acks merged into the batch's one ack.

// chunks splits batch into runs [start, end) whose encoded size stays
// within limit; it yields each run with its index. Without split (the batch
// fits), it yields the whole batch.
func chunks(batch msgBatch, limit int, split bool) func(yield func(int, span) bool) {
	return func(yield func(int, span) bool) {
		if !split {
			yield(0, span{0, batch.len()}) // the common case: one chunk
			return
		}
		start, size, idx := 0, 0, 0
		for i := range batch.len() {
			sz := batch.size(i) + 8 // protobuf tag and length
			if i > start && size+sz > limit {
				if !yield(idx, span{start, i}) {
					return
				}
				idx++
				start, size = i, 0
			}
			size += sz
		}
		yield(idx, span{start, batch.len()})
	}
}

// span is the run [start, end) of a batch.
type span struct{ start, end int }

// chunkAcks merges the acks of the chunks of one split batch. A subscriber
// delivered the batch only if every chunk was delivered to it: one that
// failed a chunk is listed with its first failure, and one that subscribed
// between two chunks got only part of the batch, so it is neither counted
// nor listed (it was not a subscriber when the batch was accepted). A
// subscriber that failed a chunk gets no later one (skip): it stops a
// batch at its first failure, as an unsplit batch stops at its first
// failing message, and a batch counts once towards its eviction.
type chunkAcks struct {
	ack       PublishAck
	delivered map[SubscriberID]bool // delivered every chunk so far
	// unreported: listed with a Timeout of an answer sent at the
	// publisher's deadline, and no failure its node reported since: its
	// delivery goes on, so it is not skipped.
	unreported map[SubscriberID]bool
}

// skip lists the subscribers the later chunks leave out: those that failed
// an earlier chunk, but groups, whose later shares go to any member. At
// most wire.MaxSkip of them, in at most budget bytes, so that the list fits
// beside a full chunk: one left off is only sent the chunk.
func (c *chunkAcks) skip(budget int) []*wire.Failure {
	var out []*wire.Failure
	for _, f := range c.ack.Failures {
		if f.Group != "" || f.Subscriber == (SubscriberID{}) || c.unreported[f.Subscriber] {
			continue
		}
		if budget -= len(f.Subscriber.Node) + len(f.Subscriber.Local) + 8; budget < 0 || len(out) == wire.MaxSkip {
			break
		}
		out = append(out, &wire.Failure{Node: f.Subscriber.Node, Local: f.Subscriber.Local})
	}
	return out
}

func (c *chunkAcks) add(i int, ans ownerAnswer) {
	ack, delivered := ans.ack, ans.delivered
	if i == 0 {
		c.ack = ack
		c.delivered = make(map[SubscriberID]bool, len(delivered))
		for _, id := range delivered {
			c.delivered[id] = true
		}
		c.unreported = ans.unreported
		return
	}
	for _, f := range ack.Failures {
		if !ans.unreported[f.Subscriber] {
			delete(c.unreported, f.Subscriber) // a failure its node reported: skipped from now on
		}
	}
	// A group with no live member fails with a zero Subscriber: failures
	// are told apart by group too.
	type failedKey struct {
		id    SubscriberID
		group string
	}
	failed := make(map[failedKey]bool, len(c.ack.Failures))
	for _, f := range c.ack.Failures {
		failed[failedKey{f.Subscriber, f.Group}] = true
	}
	for _, f := range ack.Failures {
		if k := (failedKey{f.Subscriber, f.Group}); !failed[k] {
			failed[k] = true
			delete(c.delivered, f.Subscriber)
			if f.Subscriber == (SubscriberID{}) {
				delete(c.delivered, SubscriberID{Local: groupMark + f.Group})
			}
			if ans.unreported[f.Subscriber] {
				if c.unreported == nil {
					c.unreported = map[SubscriberID]bool{}
				}
				c.unreported[f.Subscriber] = true
			}
			c.ack.Failures = append(c.ack.Failures, f)
		}
	}
	now := make(map[SubscriberID]bool, len(delivered))
	for _, id := range delivered {
		now[id] = true
	}
	for id := range c.delivered {
		if !now[id] {
			delete(c.delivered, id) // neither delivered nor failed: it left
		}
	}
	c.ack.Delivered = len(c.delivered)
}
