package pubsub

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"
)

// producerState is the actor's own state: touched only by the producer
// goroutine, except settled, which publish attempts read.
type producerState struct {
	pend        intakeQueue         // taken from in, read by cutAndIssue
	fifo        []*producerBatch    // batches cut and not yet completed, in order
	free        []*producerBatch    // recycled batches
	active      int                 // batches issued and not resolved (running or awaiting retry)
	running     int                 // attempt goroutines alive
	retrying    int                 // batches that failed and will be retried
	unissued    map[uint64]struct{} // gated attempts not issued yet: nothing else starts before they are
	nextID      uint64              // attempt IDs
	nextSeq     uint64              // batch numbers, kept by a batch across its retries
	settled     atomic.Uint64       // every batch up to this number is settled (read by publish attempts)
	initialized bool                // Initialize succeeded (or pub is no Initializer)
	stopping    bool                // a batch failed with FailBatchAndStop (or the publisher closed)
	frozen      bool                // settled stays before the batch that stopped the producer
	dead        bool                // the lifetime context ended
}

// nudge wakes the actor without blocking.
func (p *BatchingProducer) nudge() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// run is the actor: it alone changes the producer's state below mu.
func (p *BatchingProducer) run() {
	defer close(p.exited)
	defer p.cancel()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	lifetime := p.ctx.Done()
	for {
		next := p.pump()
		if p.finished() {
			return
		}
		if next.IsZero() {
			timer.Stop()
		} else {
			timer.Reset(time.Until(next))
		}
		select {
		case <-p.wake:
		case ev := <-p.events:
			p.onEvent(ev)
		case <-timer.C:
		case <-lifetime:
			lifetime = nil
			if !p.dead { // onEvent may have seen it first
				p.abandon()
			}
		}
	}
}

// finished reports whether the actor may return: intake stopped and
// drained, every future completed and no attempt goroutine left.
func (p *BatchingProducer) finished() bool {
	if len(p.fifo) > 0 || p.running > 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed != nil && p.queued == 0 && (p.closing || p.stopping || p.dead)
}

// pump does everything that can be done now: completes the futures of
// resolved batches, starts due retries and new batches, and tells Produce
// when to nudge next. It returns when the actor must wake up by itself next
// (zero: never).
func (p *BatchingProducer) pump() time.Time {
	for {
		if !p.dead && p.ctx.Err() != nil {
			// The lifetime ended and the actor has not seen it yet (it read
			// a success, an issue notice, a nudge or its timer first):
			// nothing may start on a dead lifetime, neither a retry nor a
			// new batch.
			p.abandon()
		}
		p.completeHead()
		now := time.Now()
		if p.retryDue(now) {
			continue
		}
		p.mu.Lock()
		can := p.canIssue()
		linger := p.firstAt.Add(p.cfg.Linger)
		if can && p.queued > 0 && (p.cfg.Linger == 0 || !now.Before(linger) ||
			p.queued >= p.cfg.BatchSize || p.qbytes >= p.cfg.MaxBatchBytes ||
			// A full queue (MaxQueueSize < BatchSize) cannot fill the
			// batch further: lingering would only refuse, or with
			// BlockWhenFull hold, every Produce until Linger is over.
			p.queued >= p.cfg.MaxQueueSize ||
			p.closing || p.flushSeq > p.cutSeq) {
			p.mu.Unlock()
			if p.ctx.Err() == nil { // else the loop abandons first
				p.cutAndIssue()
			}
			continue
		}
		var next time.Time
		switch {
		case !can: // a result will wake us
			p.wakeLen, p.wakeBytes = math.MaxInt, math.MaxInt
		case p.queued == 0:
			p.wakeLen, p.wakeBytes = 1, math.MaxInt
		default: // lingering: wake when the batch is full or Linger is over
			p.wakeLen, p.wakeBytes = min(p.cfg.BatchSize, p.cfg.MaxQueueSize), p.cfg.MaxBatchBytes
			next = linger
		}
		p.mu.Unlock()
		if len(p.unissued) > 0 {
			return next // retries wait for an attempt's issue report, which wakes us
		}
		for _, b := range p.fifo {
			if b.state == batchRetryWait && (next.IsZero() || b.retryAt.Before(next)) {
				next = b.retryAt
			}
		}
		return next
	}
}

// canIssue reports whether a new batch may start now. A batch counts
// against MaxInFlight until its futures complete, not only until its
// outcome is known: batches resolved behind a slow one wait in the FIFO,
// and without this bound a stuck batch would let the FIFO grow without end.
func (p *BatchingProducer) canIssue() bool {
	return !p.stopping && !p.dead && len(p.fifo) < p.cfg.MaxInFlight && p.retrying == 0 && len(p.unissued) == 0 &&
		(p.initialized || p.active == 0) // the first batch initializes alone
}

// cutAndIssue takes the next batch from the queue and starts publishing it.
// Messages whose context ended are kept in the batch, to complete in order,
// but not sent; a batch with nothing left to send is not published.
func (p *BatchingProducer) cutAndIssue() {
	b := p.newBatch()
	taken, takenBytes, size := 0, 0, 0
	for b.msgs.len() < p.cfg.BatchSize {
		if p.pend.empty() {
			p.mu.Lock()
			p.pend = p.in.take()
			p.mu.Unlock()
			if p.pend.empty() {
				break
			}
		}
		e := p.pend.front()
		sz := e.size()
		live := e.ctx.Err() == nil
		if live && b.msgs.len() > 0 && size+sz > p.cfg.MaxBatchBytes {
			break
		}
		taken++
		takenBytes += sz
		b.entries = append(b.entries, e.batchEntry(!live))
		if live {
			b.msgs.add(e.data, b.entries[len(b.entries)-1].meta)
			size += sz
		}
		p.pend.pop() // releases the references
	}
	p.mu.Lock()
	p.queued -= taken
	p.qbytes -= takenBytes
	p.cutSeq += uint64(taken)
	if taken > 0 {
		p.freeRoom()
	}
	p.mu.Unlock()
	p.fifo = append(p.fifo, b)
	if b.msgs.len() == 0 {
		// No number of its own: the next batch names the last one sent as
		// its predecessor, which an owner holds it back for (ORDER_WAIT)
		// until it settles. Numbered, it would name one no owner ever
		// accepted, and be held back until every batch before settled
		// (refused at AckNone, where nobody hears the ORDER_WAIT: lost).
		// Completed, it stores the number of the batch before it, settled
		// already.
		b.seq = p.nextSeq
		b.state = batchResolved
		b.reuse = true
		return
	}
	p.nextSeq++
	b.seq = p.nextSeq
	p.active++
	p.issue(b)
}

// issue starts an attempt for b on its own goroutine.
func (p *BatchingProducer) issue(b *producerBatch) {
	p.nextID++
	b.id = p.nextID
	b.state = batchRunning
	p.running++
	gated := p.cfg.MaxInFlight > 1
	if gated {
		// A set, not the last attempt alone: a retry issued while a later
		// batch's first attempt is not issued yet must not open the gate
		// for the batch after that one.
		if p.unissued == nil {
			p.unissued = make(map[uint64]struct{}, p.cfg.MaxInFlight)
		}
		p.unissued[b.id] = struct{}{}
	}
	go p.attempt(b.id, b, b.msgs, !p.initialized, gated)
}

// attempt publishes msgs once (initializing the topic first if needed) and
// reports to the actor. It never blocks on the report: events has room for
// two reports per attempt that can run at once.
func (p *BatchingProducer) attempt(id uint64, b *producerBatch, msgs msgBatch, initialize, gated bool) {
	ev := attemptEvent{id: id, b: b}
	if initialize {
		node, _ := p.pub.(*Node)
		var start time.Time
		if node != nil {
			start = hookClock(node.hooks.publish)
		}
		ctx, cancel := context.WithTimeout(p.ctx, p.cfg.PublishTimeout)
		var err error
		if node != nil {
			err = p.init.Initialize(ctx, p.topic)
		} else { // not this package's: it may ignore ctx
			_, err = p.untilLifetimeEnds(func() (PublishAck, error) { return PublishAck{}, p.init.Initialize(ctx, p.topic) })
		}
		cancel()
		if err == nil && node == nil && p.ctx.Err() != nil {
			// It returned late, after the lifetime ended: publishing now
			// would give a Publisher that ignores its ctx a second
			// abortGrace. Nothing is published, as after a failure.
			err = fmt.Errorf("it returned too late: %s: %w", p.stoppedBy(), p.ctx.Err())
		}
		if err != nil {
			ev.err = fmt.Errorf("pubsub: producer: initialize %q: %w", p.topic, err)
			ev.initFailed = true
			if node != nil {
				// The attempt failed before its publish: counted, emitted
				// and hooked as a rejected one.
				ack, _ := node.reject(p.topic, msgs.len(), ev.err)
				ack.Level = p.cfg.AckLevel
				node.published(p.topic, msgs.len(), msgs.bytes(), start, ack, ev.err)
			}
			p.events <- ev
			return
		}
		ev.initialized = true
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.PublishTimeout)
	if op, ok := p.pub.(orderedPublisher); ok {
		// The batch's number lets subscriber nodes keep this producer's
		// order and drop a copy retried after an owner died.
		issued := func() {}
		if gated {
			var once atomic.Bool
			issued = func() {
				if once.CompareAndSwap(false, true) {
					p.events <- attemptEvent{id: id, issued: true}
				}
			}
		}
		ev.ack, ev.err = op.publishBatchIssued(ctx, p.topic, msgs, issueOpts{issued: issued, producer: p.id, seq: b.seq, prev: b.seq - 1,
			settled: p.settled.Load, level: p.cfg.AckLevel})
	} else {
		// Without an issue report the gate opens with the result: one
		// batch at a time, as two concurrent calls may swap.
		ev.ack, ev.err = p.untilLifetimeEnds(func() (PublishAck, error) { return p.publishUnordered(ctx, msgs) })
	}
	cancel()
	p.events <- ev
}

// untilLifetimeEnds returns what call returns, call being a method of a
// Publisher or Initializer that is not a *Node, unless the producer's
// lifetime ends (Close gave up) and call has not returned abortGrace
// later: then it returns a cancellation (the caller decides what that
// means for the batch: unknown after a publish, nothing published after
// an Initialize), and call runs on by itself, its result dropped. Close
// promises to return once its ctx ends; a Publisher that ignores its ctx
// must not hold it (nor the producer's goroutine) forever. It costs a
// goroutine per attempt, only for such publishers.
func (p *BatchingProducer) untilLifetimeEnds(call func() (PublishAck, error)) (PublishAck, error) {
	type result struct {
		ack PublishAck
		err error
	}
	done := make(chan result, 1) // call's goroutine never blocks on it
	go func() {
		ack, err := call()
		done <- result{ack, err}
	}()
	select {
	case r := <-done:
		return r.ack, r.err
	case <-p.ctx.Done():
	}
	grace := time.NewTimer(abortGrace)
	defer grace.Stop()
	select {
	case r := <-done: // it honoured its ctx, cancelled with the lifetime
		return r.ack, r.err
	case <-grace.C:
	}
	return PublishAck{Topic: p.topic, Status: Rejected, Reason: ReasonCancelled},
		fmt.Errorf("pubsub: %s; the Publisher's call ignored its cancelled context for %v and was left running, its result dropped: %w",
			p.stoppedBy(), abortGrace, context.Canceled)
}

// publishUnordered publishes through a Publisher that is no
// orderedPublisher: PublishMessages when the batch has keys or headers, or
// an AckLevel to ask for (resolve and ProduceMessage let neither in
// otherwise), PublishBatch when not.
func (p *BatchingProducer) publishUnordered(ctx context.Context, msgs msgBatch) (PublishAck, error) {
	if msgs.meta == nil && p.cfg.AckLevel == AckDelivered {
		return p.pub.PublishBatch(ctx, p.topic, msgs.data)
	}
	out := make([]Outgoing, msgs.len())
	for i, data := range msgs.data {
		out[i] = Outgoing{Data: data, Key: msgs.meta[i].Key, Header: msgs.meta[i].Header}
	}
	return p.metaPub.PublishMessages(ctx, p.topic, out, WithAck(p.cfg.AckLevel))
}

// onEvent handles an attempt's report.
func (p *BatchingProducer) onEvent(ev attemptEvent) {
	delete(p.unissued, ev.id) // issued, or its result came first
	if ev.issued {
		return
	}
	p.running--
	b := ev.b
	if ev.initialized {
		p.initialized = true
	}
	ack, err := p.normalize(ev.ack, ev.err, b.msgs.len())
	ack.Level = p.cfg.AckLevel
	if err == nil {
		// Reuse msgs only when no subscriber can still be reading it: a
		// Node's local fast path hands this very slice to local mailboxes,
		// and a subscriber that timed out may still be in its handler.
		b.reuse = len(ack.Failures) == 0
		p.resolve(b, &produceResult{ack: ack})
		return
	}
	b.failures++
	b.last = &produceResult{ack: ack, err: err}
	if ack.Reason == ReasonTimeout && b.unknown == nil {
		b.unknown = b.last // this attempt may have reached subscribers
	}
	switch {
	case p.dead || p.ctx.Err() != nil:
		// The lifetime ended (Close gave up): an attempt aborted by it
		// reports context.Canceled, and its report can reach the actor
		// before the actor sees the lifetime end (abandon). It is Close's
		// abort either way, not a failure for OnPublishError, nor a
		// "cancelled before it was published": the owner may have run it.
		if !p.dead {
			// The actor has not seen the lifetime end yet: abandon now,
			// or pump would start the next batch once this one resolved.
			p.abandon()
		}
		p.abandoned.Store(true)
		// A publisher that found no owner before the attempt's context
		// ended answers ErrTopicUnavailable wrapping context.Canceled
		// (ReasonCancelled), or ErrQueueFull for an owner that stayed
		// overloaded: every try was refused, nothing was published.
		// A failed Initialize published nothing either.
		refused := ev.initFailed || errors.Is(err, ErrTopicUnavailable) || errors.Is(err, ErrQueueFull)
		if b.unknown != nil || (ack.Reason == ReasonCancelled && !refused) {
			// Aborted by Close (the attempt's ctx ended), or an earlier
			// attempt's outcome was unknown: subscribers may have run it.
			p.resolve(b, p.closedUnknown(b.msgs.len(), p.stoppedBy()+" while the batch was being published", err))
		} else if ev.initFailed { // Initialize failed or never returned: nothing was published
			p.resolve(b, p.closedResult(b.msgs.len(), p.stoppedBy()+" before the batch was published (nothing was sent)", err))
		} else { // refused outright: it was not published
			p.resolve(b, p.closedResult(b.msgs.len(), p.stoppedBy()+" while the batch was being published (the last attempt was refused)", err))
		}
	case p.stopping:
		p.resolve(b, b.failedOutcome())
	case ack.Reason == ReasonTooLarge, ack.Reason == ReasonInvalidTopic:
		p.resolve(b, b.failedOutcome()) // no retry can fix these
	case ack.Reason == ReasonClosed:
		p.stopAt(b, err) // the publisher is closed for good
	default:
		d := p.decide(b.failures, err)
		switch d.action {
		case actionRetry:
			b.state = batchRetryWait
			b.retryAt = time.Now().Add(d.delay)
			if !b.retrying {
				b.retrying = true
				p.retrying++
			}
		case actionContinue:
			p.resolve(b, b.failedOutcome())
		default:
			p.stopAt(b, err)
		}
	}
}

// resolve records b's final outcome; its futures complete once it reaches
// the head of the FIFO.
func (p *BatchingProducer) resolve(b *producerBatch, r *produceResult) {
	if b.state == batchRunning || b.state == batchRetryWait {
		p.active--
	}
	if b.retrying {
		b.retrying = false
		p.retrying--
	}
	b.state = batchResolved
	b.res = r
}

// completeHead completes the futures of the resolved batches at the head of
// the FIFO, in order, and recycles the batches.
func (p *BatchingProducer) completeHead() {
	for len(p.fifo) > 0 && p.fifo[0].state == batchResolved {
		b := p.fifo[0]
		// Counted before the futures complete: a Flush waiting on the
		// last one may read Stats as soon as it is done.
		var left, dropped uint64
		for i := range b.entries {
			switch e := &b.entries[i]; {
			case e.maybeSent:
				left++
			case e.dropped:
				dropped++
			}
		}
		n := uint64(len(b.entries))
		p.counters.rejected[ReasonTimeout].Add(left) // leftOutOfRetry's reason
		p.counters.rejected[ReasonCancelled].Add(dropped)
		if rest := n - left - dropped; rest > 0 {
			p.counters.count(b.res, rest)
		}
		p.counters.completed.Add(n)
		for i := range b.entries {
			e := &b.entries[i]
			switch {
			case e.maybeSent:
				e.fut.complete(p.leftOutOfRetry(b.unknown, e.ctx.Err()))
			case e.dropped:
				e.fut.complete(p.cancelled(e.ctx.Err()))
			default:
				e.fut.complete(b.res)
			}
		}
		// A batch whose failure stopped the producer never counts as
		// settled, nor does any after it: an owner holding a later batch
		// back until this one settles (ORDER_WAIT) must not let it through,
		// or messages after the failure would be published although the
		// producer stopped there.
		p.frozen = p.frozen || b.stopped
		if !p.frozen {
			p.settled.Store(b.seq)
		}
		copy(p.fifo, p.fifo[1:])
		p.fifo[len(p.fifo)-1] = nil
		p.fifo = p.fifo[:len(p.fifo)-1]
		p.recycle(b)
	}
}

// newBatch returns an empty batch, recycled when possible.
func (p *BatchingProducer) newBatch() *producerBatch {
	if n := len(p.free); n > 0 {
		b := p.free[n-1]
		p.free[n-1] = nil
		p.free = p.free[:n-1]
		return b
	}
	return &producerBatch{}
}

// recycle keeps b's buffers for a later batch. msgs is kept only when no
// publisher can still hold it.
func (p *BatchingProducer) recycle(b *producerBatch) {
	clear(b.entries)
	entries := b.entries[:0]
	var msgs msgBatch
	if b.reuse {
		clear(b.msgs.data)
		clear(b.msgs.meta)
		msgs.data = b.msgs.data[:0]
		// meta stays nil until a message has some: a plain batch must
		// not look like one with keys or headers.
	}
	if len(p.free) >= p.cfg.MaxInFlight+1 {
		return
	}
	*b = producerBatch{entries: entries, msgs: msgs}
	p.free = append(p.free, b)
}
