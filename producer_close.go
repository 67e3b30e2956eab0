package pubsub

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// How a BatchingProducer stops: shutting intake, finishing or abandoning what
// is queued, and the results of futures it never published.

// abortGrace is how long after the producer's lifetime ends (Close gave
// up) an attempt still waits for a Publisher or Initializer that is not a
// *Node to return; past it the call is left running, its result dropped,
// and the batch completes (outcome unknown after a publish, ReasonClosed
// after an Initialize), so that Close returns.
const abortGrace = time.Second

// stop fails everything queued with ErrClosed (wrapping cause) and stops
// starting batches; the batches in flight still complete.
func (p *BatchingProducer) stop(cause error) {
	if p.stopping {
		return
	}
	p.stopping = true
	res := p.closedResult(1, "producer stopped after a batch failed", cause)
	p.shutIntake(res)
	for _, b := range p.fifo {
		if b.state == batchRetryWait {
			p.resolve(b, b.failedOutcome())
		}
	}
}

// abandon runs when the lifetime context ends (Close gave up): it fails
// everything queued or waiting for a retry with ErrClosed; the attempts in
// flight end with their cancelled context (and count as abandoned only if
// they then fail).
func (p *BatchingProducer) abandon() {
	p.dead = true
	stopped := p.stoppedBy()
	if p.shutIntake(p.closedResult(1, stopped+" before the message was published", nil)) {
		p.abandoned.Store(true)
	}
	for _, b := range p.fifo {
		if b.state == batchRetryWait {
			p.abandoned.Store(true)
			if b.unknown != nil { // an earlier attempt may have delivered it
				p.resolve(b, p.closedUnknown(b.msgs.len(), stopped+" before the batch was retried", b.unknown.err))
			} else {
				p.resolve(b, p.closedResult(b.msgs.len(), stopped+" before the batch was retried", b.last.err))
			}
		}
	}
}

// stoppedBy says what ended the producer's lifetime, for its errors: its
// Close giving up, or its node closing.
func (p *BatchingProducer) stoppedBy() string {
	if p.nodeLife != nil && p.nodeLife.Err() != nil {
		return fmt.Sprintf("producer for %q stopped: its node closed", p.topic)
	}
	return fmt.Sprintf("producer for %q closed", p.topic)
}

// shutIntake stops intake and moves every queued message into a resolved
// batch with outcome r. It reports whether there was any.
func (p *BatchingProducer) shutIntake(r *produceResult) bool {
	b := p.newBatch()
	p.mu.Lock()
	if p.closed == nil {
		p.closed = doneFuture(r)
	}
	for _, q := range []*intakeQueue{&p.pend, &p.in} {
		for !q.empty() {
			b.entries = append(b.entries, q.front().batchEntry(false))
			q.pop()
		}
	}
	p.cutSeq += uint64(p.queued)
	p.queued, p.qbytes = 0, 0
	p.freeRoom()
	p.mu.Unlock()
	if len(b.entries) == 0 {
		p.recycle(b)
		return false
	}
	b.state = batchResolved
	b.res = r
	p.fifo = append(p.fifo, b)
	return true
}

// closedResult is a Rejected outcome with ReasonClosed for n messages,
// explaining why and wrapping cause when not nil.
func (p *BatchingProducer) closedResult(n int, why string, cause error) *produceResult {
	var err error
	if cause != nil {
		err = fmt.Errorf("%w: %s: %w", ErrClosed, why, cause)
	} else {
		err = fmt.Errorf("%w: %s", ErrClosed, why)
	}
	return p.result(PublishAck{Topic: p.topic, Status: Rejected, Reason: ReasonClosed, Messages: n}, err)
}

// closedUnknown is the outcome of n messages of a batch the producer's
// Close gave up on after it was sent: an attempt in flight, or a batch
// waiting for its retry after an attempt whose outcome is unknown. Its
// subscribers may have run it, so it is Rejected with ReasonTimeout
// (outcome unknown), not ReasonClosed ("not published"); the error wraps
// ErrTimeout and ErrClosed, and cause when not nil.
func (p *BatchingProducer) closedUnknown(n int, why string, cause error) *produceResult {
	err := fmt.Errorf("%w (outcome unknown, subscribers may have run it): %w: %s", ErrTimeout, ErrClosed, why)
	if cause != nil {
		err = fmt.Errorf("%w: %w", err, cause)
	}
	return p.result(PublishAck{Topic: p.topic, Status: Rejected, Reason: ReasonTimeout, Messages: n}, err)
}

// cancelled is the outcome of a message dropped because its context ended
// (err is the context's error).
func (p *BatchingProducer) cancelled(err error) *produceResult {
	if errors.Is(err, context.Canceled) {
		err = fmt.Errorf("pubsub: message dropped before it was published: %w", err)
	} else {
		err = fmt.Errorf("pubsub: message dropped before it was published: %w (%w)", ErrCancelled, err)
	}
	return p.result(PublishAck{Topic: p.topic, Status: Rejected, Reason: ReasonCancelled, Messages: 1}, err)
}

// leftOutOfRetry is the outcome of a message left out of a retry because
// its context ended after an attempt whose outcome is unknown (unknown):
// that attempt may have delivered it, so it is that attempt's timeout, not
// "dropped before it was published" (err is the context's error).
func (p *BatchingProducer) leftOutOfRetry(unknown *produceResult, err error) *produceResult {
	return p.result(
		PublishAck{Topic: p.topic, Status: Rejected, Reason: ReasonTimeout, Messages: 1},
		fmt.Errorf("pubsub: message left out of the batch's retry (%w) after an attempt whose outcome is unknown, which may have delivered it: %w", err, unknown.err),
	)
}
