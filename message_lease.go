package pubsub

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// messageLease holds the Messages a node builds for one batch it delivers
// to its subscribers (payload.messages), shared by every local subscriber
// and by the group members whose share is the whole batch. Once the last
// handler call that saw them has returned, the slice goes back to a pool
// for a later batch: a fan-out of 2 000-message batches otherwise
// allocates, zeroes and lets the garbage collector chase 160 KB per batch
// on every node (18% of the windowed fan-out's CPU profile; the local
// burst ran 46-78% faster without it: README "Performance").
//
// Holders: deliverWithin while it queues the batch, then each mailbox item
// that will run handlers on it, from before it is queued until the item has
// run (an item always runs once, even when its subscription ends first:
// releaseMailbox). A handler past its deadline keeps its goroutine and its
// mailbox item, so it keeps its hold. A hold never released (a bug) only
// keeps the slice from the pool; it is never reused early.
type messageLease struct {
	msgs   []Message
	refs   atomic.Int32
	bucket int // 1 + the index in messagePools; 0: not pooled
}

// Batches of fewer messages are cheap to allocate and not pooled; larger
// ones than the biggest bucket (BatchSize above 8 192, merged AckNone
// publishes) are rare and not pooled either, so the pools hold no slice
// larger than 8 192 Messages (640 KiB). sync.Pool drops what it holds
// across two garbage collections, which bounds what idle pools keep.
const (
	minPooledMessagesLog = 6  // 64 Messages
	maxPooledMessagesLog = 13 // 8 192 Messages
)

// messagePools holds released slices by capacity: bucket b holds
// capacity 1<<(b+minPooledMessagesLog).
var messagePools [maxPooledMessagesLog - minPooledMessagesLog + 1]sync.Pool

// leaseMessages returns a lease with one hold (the caller's) on an empty
// slice with room for n Messages.
func leaseMessages(n int) *messageLease {
	if n < 1<<minPooledMessagesLog || n > 1<<maxPooledMessagesLog {
		l := &messageLease{msgs: make([]Message, 0, n)}
		l.refs.Store(1)
		return l
	}
	b := bits.Len(uint(n-1)) - minPooledMessagesLog
	l, ok := messagePools[b].Get().(*messageLease)
	if !ok {
		l = &messageLease{msgs: make([]Message, 0, 1<<(b+minPooledMessagesLog)), bucket: b + 1}
	}
	l.refs.Store(1)
	return l
}

// hold adds a holder; the lease must be held already (by the caller).
func (l *messageLease) hold() { l.refs.Add(1) }

// release drops a hold. The last one clears the Messages, so the pool does
// not keep the batch's buffers alive, and pools the slice.
func (l *messageLease) release() {
	if l.refs.Add(-1) != 0 || l.bucket == 0 {
		return
	}
	clear(l.msgs)
	l.msgs = l.msgs[:0]
	messagePools[l.bucket-1].Put(l)
}
