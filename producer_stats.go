package pubsub

import "sync/atomic"

// ProducerStats counts a BatchingProducer's messages by outcome since it
// was made: with them, a loop of Produce calls can check what became of a
// burst after Flush without keeping every future. Every Produce,
// ProduceMessage (and TypedProducer) call counts once its future
// completes, in Accepted or in Rejected; until then it is Pending.
type ProducerStats struct {
	// Accepted counts messages whose future completed Accepted.
	Accepted uint64
	// Rejected counts messages whose future completed with an error,
	// whatever the reason: at once (queue full, too large, invalid,
	// cancelled, closed) or with their batch.
	Rejected uint64
	// ByReason splits Rejected by the Reason of each future's ack; nil
	// when nothing was rejected. ByReason[ReasonQueueFull] counts both
	// the producer's own full queue (QueueFull) and batches an owner
	// refused as overloaded.
	ByReason map[Reason]uint64
	// QueueFull counts the messages Produce refused at once because the
	// producer's queue held MaxQueueSize messages (without BlockWhenFull):
	// back-pressure of this producer, where the rest of
	// ByReason[ReasonQueueFull] is an owner's.
	QueueFull uint64
	// Pending counts messages queued whose future has not completed yet:
	// waiting in the queue or in a batch in flight.
	Pending uint64
	// Queued counts the Pending messages still waiting in the queue (not
	// yet cut into a batch), as MaxQueueSize counts them.
	Queued int
}

// reasonCount bounds the Reason values a producer's futures can carry.
const reasonCount = int(ReasonInvalidConfig) + 1

// producerCounters is where a producer counts the outcomes of its futures:
// once per message refused at Produce, once per batch completed by the
// actor.
type producerCounters struct {
	accepted atomic.Uint64
	rejected [reasonCount]atomic.Uint64
	// completed counts the queued messages whose futures completed (the
	// ones refused at Produce never were queued).
	completed atomic.Uint64
	// queueFull counts the messages refused at Produce by a full queue
	// (also counted in rejected).
	queueFull atomic.Uint64
}

// count counts n futures completed with r.
func (c *producerCounters) count(r *produceResult, n uint64) {
	if n == 0 {
		return
	}
	if r.err == nil {
		c.accepted.Add(n)
		return
	}
	c.rejected[min(int(r.ack.Reason), reasonCount-1)].Add(n)
}

// Stats returns the producer's counts so far. It is safe to call at any
// time, also after Close; the counts of one call may be a few messages
// apart from each other when messages complete meanwhile.
func (p *BatchingProducer) Stats() ProducerStats {
	st := ProducerStats{Accepted: p.counters.accepted.Load(), QueueFull: p.counters.queueFull.Load()}
	for r := range p.counters.rejected {
		if n := p.counters.rejected[r].Load(); n > 0 {
			if st.ByReason == nil {
				st.ByReason = make(map[Reason]uint64)
			}
			st.ByReason[Reason(r)] = n
			st.Rejected += n
		}
	}
	completed := p.counters.completed.Load() // before seq: Pending is never negative
	p.mu.Lock()
	st.Pending = p.seq - completed
	st.Queued = p.queued
	p.mu.Unlock()
	return st
}

// refused returns a future already completed with r, counted.
func (p *BatchingProducer) refused(r *produceResult) *Produced {
	p.counters.count(r, 1)
	return doneFuture(r)
}

// shared returns f, a shared future already completed (queue full or
// closed), counted once more.
func (p *BatchingProducer) shared(f *Produced) *Produced {
	p.counters.count(f.res.Load(), 1)
	return f
}
