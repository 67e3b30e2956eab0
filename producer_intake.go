package pubsub

import (
	"context"
	"sync"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// producerIntake is a BatchingProducer's queue of produced messages and
// the bookkeeping Produce, Flush, Close and the actor share under mu.
type producerIntake struct {
	mu        sync.Mutex
	in        intakeQueue // appended by Produce, taken whole by the actor
	queued    int         // messages queued and not yet cut into a batch
	qbytes    int         // their size, counted as in a batch
	firstAt   time.Time   // when the queue last went from empty to non-empty
	seq       uint64      // messages ever queued
	cutSeq    uint64      // messages ever taken out of the queue
	flushSeq  uint64      // the first flushSeq messages go out without lingering
	wakeLen   int         // Produce nudges the actor when queued reaches it...
	wakeBytes int         // ...or qbytes reaches this
	closed    *Produced   // once intake stopped: the done future Produce returns
	closing   bool        // Close was called: drain, then return
	last      *Produced   // future of the last queued message
	slab      []Produced  // futures not yet handed out
}

// intakeBlockLen is how many entries one intake block holds: 512 entries of
// 56 bytes, a 28 KiB block.
const intakeBlockLen = 512

// intakeEntry is one queued message: 56 bytes, of which the GC scans every
// pointer while it waits, so a deep queue keeps it small (keys and headers,
// rare, sit behind a pointer).
type intakeEntry struct {
	data []byte
	ctx  context.Context
	meta *wire.Meta // nil: no key or header
	fut  *Produced
}

// size is what the entry counts for in a batch.
func (e *intakeEntry) size() int {
	if e.meta == nil {
		return len(e.data) + batchOverhead
	}
	return len(e.data) + wire.MetaSize(*e.meta) + batchOverhead
}

// batchEntry returns e as an entry of a batch.
func (e *intakeEntry) batchEntry(dropped bool) producerEntry {
	b := producerEntry{ctx: e.ctx, data: e.data, fut: e.fut, dropped: dropped}
	if e.meta != nil {
		b.meta = *e.meta
	}
	return b
}

// intakeBlock is a fixed-size run of queued messages. Blocks are chained
// and never grown, so a queue of a million messages is never copied:
// Produce writes each entry once, the actor reads it once.
type intakeBlock struct {
	next *intakeBlock
	r, w int // next entry to read, next to write
	e    [intakeBlockLen]intakeEntry
}

// intakeBlocks recycles blocks between bursts; a block in it holds no
// references (pop clears every entry it reads).
var intakeBlocks = sync.Pool{New: func() any { return new(intakeBlock) }}

// intakeQueue is a FIFO of producer entries in a chain of blocks. The
// producer has two: in, written by Produce under the producer's mutex, and
// pend, read by the actor alone after it took in's chain whole (take).
type intakeQueue struct {
	head, tail *intakeBlock
}

// push appends e, starting a block when the last one is full.
func (q *intakeQueue) push(e intakeEntry) *intakeEntry {
	t := q.tail
	if t == nil || t.w == intakeBlockLen {
		b := intakeBlocks.Get().(*intakeBlock)
		if t == nil {
			q.head = b
		} else {
			t.next = b
		}
		q.tail, t = b, b
	}
	t.e[t.w] = e
	t.w++
	return &t.e[t.w-1]
}

// empty reports whether q holds no entry: a block is released as soon as
// its last written entry is read.
func (q *intakeQueue) empty() bool { return q.head == nil }

// front returns the first entry; q must not be empty.
func (q *intakeQueue) front() *intakeEntry { return &q.head.e[q.head.r] }

// pop removes the first entry, dropping its references, and releases its
// block once read to the end. q must not be empty.
func (q *intakeQueue) pop() {
	h := q.head
	h.e[h.r] = intakeEntry{}
	h.r++
	if h.r < h.w {
		return
	}
	q.head = h.next
	if q.head == nil {
		q.tail = nil
	}
	h.next, h.r, h.w = nil, 0, 0 // its entries were cleared one by one
	intakeBlocks.Put(h)
}

// take moves every entry of q into a new queue, leaving q empty.
func (q *intakeQueue) take() intakeQueue {
	t := *q
	*q = intakeQueue{}
	return t
}
