package pubsub

import "sync"

// A broadcast subscriber's chain through the chunks of split batches: it
// runs a split batch's chunks in order and none after one it did not run.

// splitChain is what a subscription keeps of the split batches reaching it.
type splitChain struct {
	// marks holds, per split batch, the last chunk that reached the
	// handler's turn and its outcome; only the mailbox's work touches it.
	marks map[uint64]splitMark
	// refused holds, per split batch, the first chunk a full mailbox
	// refused: refused where it is delivered, off the mailbox, it never
	// reaches splitGate. Guarded by mu.
	mu      sync.Mutex
	refused map[uint64]uint32
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
	last, seen := s.split.marks[c.id]
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
// It reports whether another split batch's was forgotten to make room (the
// caller counts it, Node.forgotMark).
func (s *Subscription) noteRefusedSplit(c splitChunk) (forgot bool) {
	if c.id == 0 || s.id.Group() != "" {
		return false
	}
	s.split.mu.Lock()
	defer s.split.mu.Unlock()
	if first, ok := s.split.refused[c.id]; ok && first <= c.index {
		return false
	}
	s.split.refused, forgot = boundedPut(s.split.refused, c.id, c.index, maxTrackedSplits)
	return forgot
}

// refusedBefore reports whether a full mailbox refused a chunk of c's
// batch before c that this subscription has not run since (last, seen:
// its mark of the batch).
func (s *Subscription) refusedBefore(c splitChunk, last splitMark, seen bool) bool {
	s.split.mu.Lock()
	first, ok := s.split.refused[c.id]
	s.split.mu.Unlock()
	return ok && first < c.index && (!seen || last.index < first)
}

// noteSplit records chunk c's outcome at a broadcast subscriber.
func (s *Subscription) noteSplit(c splitChunk, st DeliveryStatus) {
	if c.id == 0 || s.id.Group() != "" {
		return
	}
	if last, seen := s.split.marks[c.id]; seen && last.index > c.index {
		return // an older chunk, late: the later one's outcome stands
	}
	var forgot bool
	if s.split.marks, forgot = boundedPut(s.split.marks, c.id, splitMark{index: c.index, status: st}, maxTrackedSplits); forgot {
		s.node.forgotMark("producers/split-marks")
	}
}
