package pubsub

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"time"
)

// A subscription running a batch in its mailbox: order and duplicate
// checks per producer, the handler calls, the outcome it reports.

// decidedOutcome is a subscriber's outcome deliver decided without its
// mailbox, kept for the hooks.
type decidedOutcome struct {
	id       SubscriberID
	messages int
	status   DeliveryStatus
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
				t.set(i, OutOfOrder)
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
		if last, ok := s.rerouted[origin.producer]; ok && last.seq == origin.seq && last.at == origin.at && last.share == fingerprint(batch) {
			t.set(i, last.status)
			return
		}
	} else if origin.producer != "" {
		// A producer's batches reach the subscriber in its order: an older
		// one arriving late (it was redirected, or retried after its owner
		// died) is dropped and reported; the same one again was delivered.
		last := s.producers[origin.producer]
		switch {
		case origin.seq == last.seq:
			if s.id.Group() == "" || last.share == fingerprint(batch) {
				t.set(i, last.status) // the same batch again: the outcome it had
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
				t.set(i, OutOfOrder)
				s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
				return
			}
		case origin.seq < last.seq:
			t.set(i, OutOfOrder)
			s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
			return
		}
	}
	ctx = context.WithValue(ctx, subscriberKey{}, s.id)
	started := hookClock(s.node.hooks.handled)
	st, processed, run := s.splitGate(origin.split)
	if run {
		st, processed = s.run(ctx, batch)
	}
	s.noteSplit(origin.split, st)
	ran := sinceHookClock(started) // 0, and no clock read, without hooks
	if seq.seq != 0 {
		s.lastStatus = st
	}
	switch {
	case origin.reroute:
		s.rerouted = trackProducer(s.rerouted, origin.producer,
			producerMark{seq: origin.seq, at: origin.at, status: st, share: fingerprint(batch)})
	case origin.producer != "":
		mark := producerMark{seq: origin.seq, status: st}
		if s.id.Group() != "" {
			mark.share = fingerprint(batch)
		}
		s.producers = trackProducer(s.producers, origin.producer, mark)
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
		s.node.handled(s.topic, s.id, len(batch), t.status(i), started.Sub(queued), ran)
	}
}

// trackProducer records mark for producer in marks and returns marks.
// Past maxTrackedProducers it forgets another producer's: every node
// incarnation and producer ever seen would otherwise stay. Only that one's
// protection is lost, against a batch already older than its newest.
func trackProducer(marks map[string]producerMark, producer string, mark producerMark) map[string]producerMark {
	return boundedPut(marks, producer, mark, maxTrackedProducers)
}

// producerMark is the last batch of one producer a subscription ran, and
// its outcome.
type producerMark struct {
	seq    uint64
	status DeliveryStatus
	share  shareMark // a group member's: which messages that batch gave it
	at     uint64    // a re-routed share's: its messages' positions (positionsMark)
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
func (s *Subscription) run(ctx context.Context, batch []Message) (status DeliveryStatus, processed int) {
	status = Delivered
	prop := s.node.cfg.Propagator
	for j := range batch {
		if s.isDone() {
			// Ended before this message (mid-batch, or between handle's
			// check and here): no further message reaches it. Checked
			// right before each call, so only a call already handed its
			// message can run after the end.
			return SubscriberGone, j
		}
		mctx := ctx
		if prop != nil {
			mctx = prop.Extract(ctx, batch[j].Header)
		}
		if err := s.call(mctx, &batch[j]); err != nil {
			if !errors.As(err, new(*decodeError)) {
				if ok, held := s.node.log.limit.allow("handler/" + s.id.Local); ok {
					s.node.log.Warn("handler failed", "topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held)
				}
				return HandlerError, j
			}
			status = DecodeError
			if ok, held := s.node.log.limit.allow("decode/" + s.id.Local); ok {
				s.node.log.Warn("message rejected by the codec", "topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held)
			}
		}
	}
	return status, len(batch)
}

// splitMark is the last chunk of a split batch a subscription came to, and
// its outcome.
type splitMark struct {
	index  uint32
	status DeliveryStatus
}

// maxTrackedSplits bounds the split batches a subscription keeps the last
// chunk of: several publishers' split batches can be under way at once.
const maxTrackedSplits = 64

// splitGate decides whether chunk c of a split batch runs: a broadcast
// subscriber runs a split batch's chunks from the first, in order, and
// none after one it did not run. The publisher skips a subscriber that
// failed a chunk only when the failure was answered before the next chunk
// left; one answered at the publisher's deadline (its outcome still to
// come) or held up on its way is still sent the next chunk, which must not
// run after a gap. The same chunk again (an attempt retried after its
// answer was lost) gets its outcome, not a second run. A chunk that does
// not run is OutOfOrder: not the subscriber's failure (no eviction
// strike), and the publisher's merged ack keeps the failure of the chunk
// it missed. A group member's shares of the chunks are independent: not
// gated.
func (s *Subscription) splitGate(c splitChunk) (status DeliveryStatus, processed int, run bool) {
	if c.id == 0 || s.id.Group() != "" {
		return 0, 0, true
	}
	last, seen := s.splits[c.id]
	switch {
	case s.refusedBefore(c, last, seen):
		// An earlier chunk its full mailbox refused, answered at the
		// publisher's deadline before its node reported: a gap.
		return OutOfOrder, 0, false
	case !seen:
		// Its first chunk, or it subscribed after the earlier ones left
		// (it gets the rest, not counted as delivered: chunkAcks).
		return 0, 0, true
	case last.index == c.index:
		return last.status, 0, false
	case last.index+1 == c.index && (last.status == Delivered || last.status == DecodeError):
		return 0, 0, true
	}
	return OutOfOrder, 0, false
}

// noteRefusedSplit records that a full mailbox refused chunk c (a
// broadcast subscriber's, before its mailbox ever saw it): without it,
// splitGate took a later chunk for the first this subscriber got.
func (s *Subscription) noteRefusedSplit(c splitChunk) {
	if c.id == 0 || s.id.Group() != "" {
		return
	}
	s.splitsMu.Lock()
	defer s.splitsMu.Unlock()
	if first, ok := s.refusedSplits[c.id]; ok && first <= c.index {
		return
	}
	s.refusedSplits = boundedPut(s.refusedSplits, c.id, c.index, maxTrackedSplits)
}

// refusedBefore reports whether a full mailbox refused a chunk of c's
// batch before c that this subscription has not run since (last, seen:
// its mark of the batch).
func (s *Subscription) refusedBefore(c splitChunk, last splitMark, seen bool) bool {
	s.splitsMu.Lock()
	first, ok := s.refusedSplits[c.id]
	s.splitsMu.Unlock()
	return ok && first < c.index && (!seen || last.index < first)
}

// noteSplit records chunk c's outcome at a broadcast subscriber.
func (s *Subscription) noteSplit(c splitChunk, st DeliveryStatus) {
	if c.id == 0 || s.id.Group() != "" {
		return
	}
	if last, seen := s.splits[c.id]; seen && last.index > c.index {
		return // an older chunk, late: the later one's outcome stands
	}
	s.splits = boundedPut(s.splits, c.id, splitMark{index: c.index, status: st}, maxTrackedSplits)
}

// maxTrackedProducers bounds the producers (BatchingProducers and the
// implicit one of each publishing node incarnation) a subscription keeps
// the last batch number of.
const maxTrackedProducers = 4096

// call runs the handler, turning a panic into an error so one bad message
// cannot take the node down.
func (s *Subscription) call(ctx context.Context, m *Message) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pubsub: handler panicked: %v", r)
		}
	}()
	return s.handler(ctx, m)
}
