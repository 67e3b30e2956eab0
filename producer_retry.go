package pubsub

import (
	"errors"
	"fmt"
	"time"
)

// What happens to a producer's failed attempt: OnPublishError's decision,
// the outcome normalised to the Produced contract, and the retry, which
// sends the same messages again once an attempt's outcome is unknown.

// stopAt fails b with its last outcome and stops the producer there: b
// never counts as settled (see completeHead).
func (p *BatchingProducer) stopAt(b *producerBatch, err error) {
	p.resolve(b, b.failedOutcome())
	b.stopped = true
	p.stop(err)
}

// decide asks OnPublishError; an unknown decision counts as FailBatchAndStop.
func (p *BatchingProducer) decide(attempt int, err error) ErrorDecision {
	d := p.cfg.OnPublishError(attempt, err)
	if d.action > actionRetry {
		return FailBatchAndStop
	}
	return d
}

// normalize makes a publisher's answer follow the Publisher contract: err
// non-nil exactly when the ack is Rejected, and errors.Is(err,
// ack.Reason.Err()).
func (p *BatchingProducer) normalize(ack PublishAck, err error, n int) (PublishAck, error) {
	if err == nil && ack.Status == Rejected {
		err = ack.Reason.Err()
		if err == nil {
			err = errors.New("pubsub: publisher rejected the batch without a reason")
		}
	}
	if err != nil {
		if ack.Status != Rejected || ack.Reason == ReasonNone || !errors.Is(err, ack.Reason.Err()) {
			return rejected(p.topic, n, err)
		}
		if ack.Topic == "" {
			ack.Topic = p.topic
		}
		return ack, err
	}
	if ack.Topic == "" {
		ack.Topic = p.topic
	}
	return ack, nil
}

// retryDue restarts the batches whose retry delay is over, leaving out the
// messages whose context ended meanwhile, unless an earlier attempt's
// outcome is unknown. It reports whether it did anything.
//
// After an attempt whose outcome is unknown (it may have reached
// subscribers) the retry sends the very same messages, those whose context
// ended included: a subscriber answers a producer batch it already ran, or
// a chunk of one Node.PublishBatch split (numbered batch<<16|chunk), with
// the outcome it had, by its number alone. A retry without some messages is
// split at other boundaries, and a subscriber that ran chunk k of the
// failed attempt answered chunk k of the retry Delivered without running
// the messages that moved into it. Only when every message's context ended
// is nothing sent: each completes with the unknown outcome.
func (p *BatchingProducer) retryDue(now time.Time) bool {
	did := false
	for _, b := range p.fifo {
		if len(p.unissued) > 0 {
			// In batch order, each once the attempt before it was issued,
			// as new batches start: two retries issued at once could swap.
			break
		}
		if b.state != batchRetryWait || now.Before(b.retryAt) {
			continue
		}
		did = true
		keep := b.unknown != nil && !allEnded(b)
		// A fresh slice: the failed attempt's publisher may still hold the
		// old one (see onEvent).
		msgs := msgBatch{data: make([][]byte, 0, b.msgs.len())}
		for i := range b.entries {
			e := &b.entries[i]
			if !e.dropped && !keep && e.ctx.Err() != nil {
				e.dropped = true
				// An earlier attempt may have delivered it: not "dropped
				// before it was published".
				e.maybeSent = b.unknown != nil
			}
			if !e.dropped {
				msgs.add(e.data, e.meta)
			}
		}
		b.msgs = msgs
		if msgs.len() == 0 {
			p.resolve(b, nil) // every message was dropped: nothing to send
			continue
		}
		p.issue(b)
	}
	return did
}

// allEnded reports whether the context of every message b still sends ended.
func allEnded(b *producerBatch) bool {
	for i := range b.entries {
		if e := &b.entries[i]; !e.dropped && e.ctx.Err() == nil {
			return false
		}
	}
	return true
}

// failedOutcome is the outcome of a batch whose attempts failed: its last
// attempt's, unless an earlier attempt's outcome was unknown (ReasonTimeout:
// it may have delivered the batch) and the last one was refused outright
// (closed, topic unavailable, ...). A refusal says only that the last
// attempt delivered nothing, so the batch's outcome stays unknown: reporting
// it "not published" would deny messages subscribers may have run.
func (b *producerBatch) failedOutcome() *produceResult {
	if b.unknown == nil || b.last == nil || b.last.ack.Reason == ReasonTimeout {
		return b.last
	}
	ack := b.unknown.ack
	ack.Messages = b.last.ack.Messages
	return &produceResult{ack: ack, err: fmt.Errorf("%w (a later attempt failed: %w)", b.unknown.err, b.last.err)}
}
