package pubsub

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime/debug"
	"slices"
	"time"
)

// A subscription running a batch in its mailbox: order and duplicate
// checks per producer, the handler calls, the outcome it reports.

// decidedStatus is subscriber i's status in a batch, decided by deliver
// without its mailbox, set once the subscriber lock is released.
type decidedStatus struct {
	i      int
	status DeliveryStatus
}

// decidedOutcome is a subscriber's outcome deliver decided without its
// mailbox, kept for the hooks.
type decidedOutcome struct {
	id       SubscriberID
	messages int
	status   DeliveryStatus
}

// answerUnrun reports status i of t for a batch not run again, and keeps
// it as the outcome of the owner's batch seq: a copy of that batch (an
// at-least-once re-send) is answered with it, not with the outcome of the
// batch before.
func (s *Subscription) answerUnrun(t *batchTracker, i int, seq batchSeq, st DeliveryStatus) {
	t.set(i, st)
	if seq.seq != 0 {
		s.lastStatus = st
	}
}

// handle runs on the subscription's mailbox: the handler sees the batch's
// messages in order and stops at the first error.
func (s *Subscription) handle(ctx context.Context, batch []Message, origin batchOrigin, seq batchSeq, t *batchTracker, i int, queued time.Time) {
	if ctx.Err() != nil {
		if !s.isDone() { // a batch released by the end runs beside the mailbox: no state
			s.noteSplit(origin.split, Timeout)
		}
		s.node.handled(s.topic, s.id, len(batch), Timeout, sinceHookClock(queued), 0)
		return // already reported as Timeout
	}
	if s.isDone() {
		t.set(i, SubscriberGone)
		s.node.handled(s.topic, s.id, len(batch), SubscriberGone, sinceHookClock(queued), 0)
		return
	}
	if seq.seq != 0 {
		// An owner numbers the batches of a topic in the order it accepted
		// them: one that arrives after a later one (it was held up on a
		// stalled route past its publish's timeout) is dropped, not
		// delivered out of order.
		last := s.lastBatch
		if seq.owner == last.owner && seq.inc == last.inc && seq.seq <= last.seq {
			if seq.seq == last.seq {
				t.set(i, s.lastStatus) // a copy of the batch just handled: its outcome
			} else {
				t.setBehind(i) // the owner can tell a late copy from a forged mark
				s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
			}
			return
		}
		s.lastBatch = seq
	}
	if origin.reroute {
		// A copy of a re-routed share this subscription ran (its batch was
		// retried through the same owner and the share re-routed to it
		// again): its outcome, not a second run.
		if last, ok := s.rerouted.get(origin.producer); ok && last.seq == origin.seq && last.at == origin.at && last.share == fingerprint(batch) {
			s.answerUnrun(t, i, seq, last.status)
			return
		}
	} else if origin.producer != "" {
		// A producer's batches reach the subscriber in its order: an older
		// one arriving late (it was redirected, or retried after its owner
		// died) is dropped and reported; the same one again was delivered.
		last, _ := s.producers.get(origin.producer)
		switch {
		case origin.seq == last.seq:
			if s.id.Group() == "" || last.share == fingerprint(batch) {
				s.answerUnrun(t, i, seq, last.status) // the same batch again: the outcome it had
				return
			}
			// A group member's share of the same batch, but not the share
			// it ran: the batch was retried (its owner crashed mid-batch,
			// or its answer was lost) and assigned anew, so some of these
			// messages were not run here, and its earlier outcome would
			// claim them. On an at-most-once topic running them could
			// repeat what another member ran: dropped and reported, not
			// Delivered. On an at-least-once topic repeats are allowed
			// and losing them is not: run.
			if !origin.atLeastOnce {
				s.answerUnrun(t, i, seq, OutOfOrder)
				s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
				return
			}
		case origin.seq < last.seq:
			if s.id.Group() == "" && last.ran.has(origin.seq) {
				// A late copy of a batch it ran (the publisher retried it
				// after losing the answer, and later batches went first):
				// its outcome, not a second run, nor OutOfOrder, which
				// would say its messages did not reach this subscriber.
				s.answerUnrun(t, i, seq, Delivered)
				return
			}
			s.answerUnrun(t, i, seq, OutOfOrder)
			s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
			return
		}
	}
	ctx = context.WithValue(ctx, subscriberKey{}, s.id)
	started := hookClock(s.node.hooks.handled)
	st, processed, run := s.splitGate(origin.split)
	var handlerErr error
	if run {
		st, processed, handlerErr = s.run(ctx, batch)
	}
	s.noteSplit(origin.split, st)
	ran := sinceHookClock(started) // 0, and no clock read, without hooks
	if seq.seq != 0 {
		s.lastStatus = st
	}
	switch {
	case origin.reroute:
		s.rerouted.put(s.node, origin.producer,
			producerMark{seq: origin.seq, at: origin.at, status: st, share: fingerprint(batch)})
	case origin.producer != "":
		mark := producerMark{seq: origin.seq, status: st}
		if s.id.Group() != "" {
			mark.share = fingerprint(batch)
		} else if prev, ok := s.producers.get(origin.producer); ok {
			mark.ran = prev.ran
			if prev.status == Delivered {
				mark.ran.add(prev.seq)
			}
		}
		s.producers.put(s.node, origin.producer, mark)
	}
	if ctx.Err() != nil {
		// The deadline came while the handler ran: Timeout, whatever it
		// returned. The deadline's own report (expire) runs on a goroutine
		// of its own and may not have run yet: a handler that returned
		// because its ctx ended beat it with Delivered (or HandlerError).
		t.expire()
	}
	if st == SubscriberGone {
		t.setPartial(i, st, processed)
	} else {
		t.set(i, st)
	}
	if !started.IsZero() && (run || st == OutOfOrder) { // not a chunk's outcome told again
		// After the report, so a slow hook cannot turn the outcome into a
		// Timeout, and with the status the owner got (Timeout when the
		// deadline came first, whatever the handler did after).
		s.node.handledErr(s.topic, s.id, len(batch), t.status(i), started.Sub(queued), ran, handlerErr)
	}
}

// producerMark is the last batch of one producer a subscription ran, and
// its outcome.
type producerMark struct {
	seq    uint64
	status DeliveryStatus
	share  shareMark  // a group member's: which messages that batch gave it
	at     uint64     // a re-routed share's: its messages' positions (positionsMark)
	ran    ranBatches // a broadcast subscriber's: the batches it ran before this one
}

// ranBatches holds the numbers of the last batches of a producer before
// its mark that a subscriber (not a group member: which share it ran
// depends on the attempt) ran to the end, newest first; 0 is none. A
// copy of one of them arriving after a later batch (its publisher retried
// it, the first answer lost) is answered Delivered rather than OutOfOrder.
// They cover the default MaxInFlight's batches (4 of them: 32 bytes a
// mark); an older copy is answered OutOfOrder, as every late copy was
// before (it then claims less than happened, never more).
type ranBatches [DefaultMaxInFlight]uint64

func (r *ranBatches) add(seq uint64) {
	copy(r[1:], r[:len(r)-1])
	r[0] = seq
}

func (r *ranBatches) has(seq uint64) bool {
	return seq != 0 && slices.Contains(r[:], seq)
}

// positionsMark hashes a share's message indices in its batch.
func positionsMark(idx []uint32) uint64 {
	h := uint64(fnvOffset)
	for _, k := range idx {
		h = fnvUint(h, uint64(k))
	}
	return h
}

// shareMark identifies the messages of a group member's share, whatever
// their order: a retried producer batch may be assigned anew, and only the
// same share again may be answered with the outcome it had.
type shareMark struct {
	count int
	sum   uint64
}

// shareSeed seeds share fingerprints, compared only within this process.
var shareSeed = maphash.MakeSeed()

// fingerprint returns batch's shareMark. It runs once per batch a group
// member handles from a producer, so it hashes with maphash (about 10 ns
// for a 128-byte message). A message's header counts as its data and key
// do: messages equal but for their headers are different messages, and a
// share of one is not a copy of a share of the other.
func fingerprint(batch []Message) shareMark {
	m := shareMark{count: len(batch)}
	for j := range batch {
		h := maphash.Bytes(shareSeed, batch[j].Data)
		if batch[j].Key != "" {
			h = mix64(h ^ maphash.String(shareSeed, batch[j].Key))
		}
		if len(batch[j].Header) != 0 {
			h = mix64(h ^ headerHash(batch[j].Header))
		}
		m.sum += mix64(h)
	}
	return m
}

// headerHash hashes a header whatever its maps' iteration order: each
// name with its values, in order, summed over the names.
func headerHash(hd Header) uint64 {
	var sum uint64
	for k, vs := range hd {
		h := maphash.String(shareSeed, k)
		for _, v := range vs {
			h = mix64(h ^ maphash.String(shareSeed, v))
		}
		sum += mix64(h ^ uint64(len(vs)))
	}
	return sum + 1 // a header with no names still differs from none
}

// run hands a batch's messages to the handler in order, stopping at the
// first error. A message its codec rejects (a Topic's handler) is skipped
// and reported as DecodeError once the rest of the batch ran. With a
// Propagator, each message gets the ctx it extracts from its header.
//
// A subscription that ends partway through (Unsubscribe, Close) stops
// there: the batch is SubscriberGone, not Delivered, and processed says
// how many messages ran, so the owner re-routes only the rest of a group
// member's share.
func (s *Subscription) run(ctx context.Context, batch []Message) (status DeliveryStatus, processed int, err error) {
	status = Delivered
	prop := s.node.cfg.Propagator
	for j := range batch {
		if s.isDone() {
			// Ended before this message (mid-batch, or between handle's
			// check and here): no further message reaches it. Checked
			// right before each call, so only a call already handed its
			// message can run after the end.
			return SubscriberGone, j, nil
		}
		mctx := ctx
		if prop != nil {
			mctx = s.extract(ctx, prop, batch[j].Header)
		}
		if cerr := s.call(mctx, &batch[j]); cerr != nil {
			err = cerr
			if !errors.As(err, new(*decodeError)) {
				if ok, held := s.node.log.limit.allow("handler/" + s.id.Local); ok {
					attrs := []any{"topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held}
					if p := new(PanicError); errors.As(err, &p) {
						attrs = append(attrs, "stack", string(p.Stack))
					}
					s.node.log.Warn("handler failed", attrs...)
				}
				return HandlerError, j, err
			}
			status = DecodeError
			if ok, held := s.node.log.limit.allow("decode/" + s.id.Local); ok {
				s.node.log.Warn("message rejected by the codec", "topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held)
			}
		}
	}
	return status, len(batch), err
}

// maxTrackedProducers bounds the producers (BatchingProducers and the
// implicit one of each publishing node incarnation) a subscription keeps
// the last batch number of, and those a topic actor holds back batches
// for; the node's budget bounds all of them together (producer_marks.go).
const maxTrackedProducers = 4096

// extract runs the Propagator's Extract for one message. A panic in it
// (a propagator choking on a malformed header it did not write, say) is
// logged and the handler gets ctx unchanged: tracing is auxiliary, so it
// costs the message its trace context, never the message or the node.
func (s *Subscription) extract(ctx context.Context, prop Propagator, h Header) (mctx context.Context) {
	defer func() {
		if r := recover(); r != nil {
			mctx = ctx
			if ok, held := s.node.log.limit.allow("extract/" + s.id.Local); ok {
				s.node.log.Error("Propagator.Extract panicked; the handler gets the message without its trace context",
					"topic", s.topic, "subscriber", s.id.String(), "panic", r, "suppressed", held)
			}
		}
	}()
	if mctx = prop.Extract(ctx, h); mctx == nil {
		mctx = ctx
	}
	return mctx
}

// call runs the handler, turning a panic into an error so one bad message
// cannot take the node down.
func (s *Subscription) call(ctx context.Context, m *Message) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	return s.handler(ctx, m)
}

// PanicError is a handler's recovered panic, as the error its batch
// failed with (HandlerError): HandledInfo.Err holds one, for errors.As.
// The node logs its Stack too, when it has a Logger.
type PanicError struct {
	// Value is what the handler panicked with.
	Value any
	// Stack is the handler goroutine's stack at the panic (debug.Stack).
	Stack []byte
}

// Error says the handler panicked, and with what.
func (p *PanicError) Error() string { return fmt.Sprintf("pubsub: handler panicked: %v", p.Value) }

// Unwrap returns Value when it is an error (a handler that panicked with
// an error), so errors.Is and errors.As see through the panic; else nil.
func (p *PanicError) Unwrap() error {
	err, _ := p.Value.(error)
	return err
}
