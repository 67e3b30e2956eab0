package pubsub

import (
	"sync"
	"sync/atomic"
)

// refusedShares remembers the last group shares of producer batches a
// subscription's full mailbox refused. The owner re-routes such a share to
// another member, which runs it; a retry of the batch through the same
// owner is assigned as the first attempt was, and gives this member the
// share again. By then its mailbox may have room, and running the share
// would repeat what the other member ran (an at-most-once topic). So the
// copy is refused again, and the owner, seeing a retry, reports it rather
// than re-routing it a second time (reroutes.reroutable).
//
// deliver reads and writes it outside the mailbox, under mu; any is set
// once something was refused, so a member that never filled its mailbox
// pays one atomic load per share.
type refusedShares struct {
	any atomic.Bool
	mu  sync.Mutex
	// by holds each producer's refused batches apart: a producer's batches
	// push out only its own older ones, never another's. The node's
	// implicit producer, whose attempts are renumbered and so never
	// retried as they were, fills no slot a BatchingProducer's retry needs.
	by map[string]*refusedRing
}

// maxRefusedShares bounds what a subscription remembers per producer: a
// producer's retries come within a few batches (MaxInFlight, split
// chunks). maxRefusedProducers bounds the producers; past it one is
// forgotten.
const (
	maxRefusedShares    = 4 * DefaultMaxInFlight // MaxInFlight batches split in up to 4 chunks each
	maxRefusedProducers = 256
)

// refusedRing is one producer's last refused batches.
type refusedRing struct {
	seqs [maxRefusedShares]uint64
	n    int // slots filled
	next int
}

func (r *refusedRing) has(seq uint64) bool {
	for _, s := range r.seqs[:r.n] {
		if s == seq {
			return true
		}
	}
	return false
}

// note records that origin's share was refused, and reports whether
// another producer's were forgotten to make room (the caller counts it,
// Node.forgotMark). Only a producer's batch on an at-most-once topic is
// retried as it was; re-routes carry their own copy check
// (Subscription.rerouted).
func (r *refusedShares) note(origin batchOrigin) (forgot bool) {
	if !refusable(origin) {
		return false
	}
	r.mu.Lock()
	ring := r.by[origin.producer]
	if ring == nil {
		ring = &refusedRing{}
		r.by, forgot = boundedPut(r.by, origin.producer, ring, maxRefusedProducers)
	}
	if !ring.has(origin.seq) { // a copy refused again keeps its one slot
		ring.seqs[ring.next] = origin.seq
		ring.next = (ring.next + 1) % maxRefusedShares
		ring.n = min(ring.n+1, maxRefusedShares)
	}
	r.mu.Unlock()
	r.any.Store(true)
	return forgot
}

// has reports whether origin's share was refused before.
func (r *refusedShares) has(origin batchOrigin) bool {
	if !r.any.Load() || !refusable(origin) {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	ring := r.by[origin.producer]
	return ring != nil && ring.has(origin.seq)
}

func refusable(origin batchOrigin) bool {
	return origin.producer != "" && !origin.reroute && !origin.atLeastOnce
}
