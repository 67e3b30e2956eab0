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
	any  atomic.Bool
	mu   sync.Mutex
	ring [maxRefusedShares]refusedShare
	next int
}

// maxRefusedShares bounds what a subscription remembers: a producer's
// retries come within a few batches (MaxInFlight, split chunks).
const maxRefusedShares = 16

type refusedShare struct {
	producer string
	seq      uint64
}

// note records that origin's share was refused. Only a producer's batch
// on an at-most-once topic is retried as it was; re-routes carry their own
// copy check (Subscription.rerouted).
func (r *refusedShares) note(origin batchOrigin) {
	if !refusable(origin) {
		return
	}
	r.mu.Lock()
	r.ring[r.next] = refusedShare{producer: origin.producer, seq: origin.seq}
	r.next = (r.next + 1) % maxRefusedShares
	r.mu.Unlock()
	r.any.Store(true)
}

// has reports whether origin's share was refused before.
func (r *refusedShares) has(origin batchOrigin) bool {
	if !r.any.Load() || !refusable(origin) {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.ring {
		if e.seq == origin.seq && e.producer == origin.producer {
			return true
		}
	}
	return false
}

func refusable(origin batchOrigin) bool {
	return origin.producer != "" && !origin.reroute && !origin.atLeastOnce
}
