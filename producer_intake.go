package pubsub

import (
	"context"
	"sync"
	"time"
	"unsafe"

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
	// room, when not nil, is closed when queued drops or intake stops:
	// Produce calls blocked on a full queue (BlockWhenFull) wait on it.
	room chan struct{}
}

// freeRoom wakes the Produce calls blocked on a full queue; call it with
// mu held whenever queued drops or closed is set.
func (in *producerIntake) freeRoom() {
	if in.room != nil {
		close(in.room)
		in.room = nil
	}
}

// intakeBlockLen is how many entries one intake block holds: 512 entries of
// 32 bytes and an 88-byte header, an 18 KiB allocation.
const intakeBlockLen = 512

// intakeEntry is one queued message as its block holds it: 32 bytes. The
// GC marks every word of a queued message on each cycle, and a deep queue
// holds a million of them, so what messages share or rarely have lives
// beside the entries on the block: the context, once per run of entries
// produced with the same one, and keys and headers. A message produced
// with a context of its own (a request's) still costs 56 bytes: its entry
// and its run.
type intakeEntry struct {
	data []byte
	fut  *Produced
}

// queuedMessage is one queued message with everything its block knows of
// it: what Produce pushes and what the actor reads.
type queuedMessage struct {
	data []byte
	ctx  context.Context
	meta *wire.Meta // nil: no key or header
	fut  *Produced
}

// size is what the message counts for in a batch.
func (m queuedMessage) size() int {
	if m.meta == nil {
		return len(m.data) + batchOverhead
	}
	return len(m.data) + wire.MetaSize(*m.meta) + batchOverhead
}

// batchEntry returns m as an entry of a batch.
func (m queuedMessage) batchEntry(dropped bool) producerEntry {
	b := producerEntry{ctx: m.ctx, data: m.data, fut: m.fut, dropped: dropped}
	if m.meta != nil {
		b.meta = *m.meta
	}
	return b
}

// contextRun is the context of a block's entries from entry from on, up to
// the next run's first entry.
type contextRun struct {
	from int
	ctx  context.Context
}

// entryMeta is the key and header of a block's entry at.
type entryMeta struct {
	at   int
	meta *wire.Meta
}

// intakeBlock is a fixed-size run of queued messages. Blocks are chained
// and never grown, so a queue of a million messages is never copied:
// Produce writes each entry once, the actor reads it once.
type intakeBlock struct {
	next   *intakeBlock
	r, w   int          // next entry to read, next to write
	ctxs   []contextRun // in entry order; the reader's is ctxs[cr]
	metas  []entryMeta  // in entry order; the reader's next is metas[mr]
	cr, mr int
	e      [intakeBlockLen]intakeEntry
}

// sameContext reports whether a and b are the same context value. It
// compares the two words of each interface rather than the interfaces,
// which panics when both hold one type that is not comparable (a context
// struct with a map, passed by value): equal words are the same dynamic
// type and the same value; anything else counts as a new run.
func sameContext(a, b context.Context) bool {
	return *(*[2]unsafe.Pointer)(unsafe.Pointer(&a)) == *(*[2]unsafe.Pointer)(unsafe.Pointer(&b))
}

// release drops every reference the block holds (pop cleared the entries)
// and returns it to the pool.
func (b *intakeBlock) release() {
	clear(b.ctxs)
	clear(b.metas)
	b.ctxs, b.metas = b.ctxs[:0], b.metas[:0]
	b.next, b.r, b.w, b.cr, b.mr = nil, 0, 0, 0, 0
	intakeBlocks.Put(b)
}

// intakeBlocks recycles blocks between bursts; a block in it holds no
// references.
var intakeBlocks = sync.Pool{New: func() any { return new(intakeBlock) }}

// intakeQueue is a FIFO of producer entries in a chain of blocks. The
// producer has two: in, written by Produce under the producer's mutex, and
// pend, read by the actor alone after it took in's chain whole (take).
type intakeQueue struct {
	head, tail *intakeBlock
}

// push appends m, starting a block when the last one is full.
func (q *intakeQueue) push(m queuedMessage) {
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
	if n := len(t.ctxs); n == 0 || !sameContext(t.ctxs[n-1].ctx, m.ctx) {
		t.ctxs = append(t.ctxs, contextRun{from: t.w, ctx: m.ctx})
	}
	if m.meta != nil {
		t.metas = append(t.metas, entryMeta{at: t.w, meta: m.meta})
	}
	t.e[t.w] = intakeEntry{data: m.data, fut: m.fut}
	t.w++
}

// empty reports whether q holds no entry: a block is released as soon as
// its last written entry is read.
func (q *intakeQueue) empty() bool { return q.head == nil }

// front returns the first message; q must not be empty.
func (q *intakeQueue) front() queuedMessage {
	h := q.head
	e := &h.e[h.r]
	m := queuedMessage{data: e.data, fut: e.fut, ctx: h.ctxs[h.cr].ctx}
	if h.mr < len(h.metas) && h.metas[h.mr].at == h.r {
		m.meta = h.metas[h.mr].meta
	}
	return m
}

// pop removes the first entry, dropping its references, and releases its
// block once read to the end. q must not be empty.
func (q *intakeQueue) pop() {
	h := q.head
	h.e[h.r] = intakeEntry{}
	if h.mr < len(h.metas) && h.metas[h.mr].at == h.r {
		h.metas[h.mr] = entryMeta{}
		h.mr++
	}
	h.r++
	if h.cr+1 < len(h.ctxs) && h.ctxs[h.cr+1].from == h.r {
		h.ctxs[h.cr] = contextRun{} // read past its run
		h.cr++
	}
	if h.r < h.w {
		return
	}
	q.head = h.next
	if q.head == nil {
		q.tail = nil
	}
	h.release()
}

// take moves every entry of q into a new queue, leaving q empty.
func (q *intakeQueue) take() intakeQueue {
	t := *q
	*q = intakeQueue{}
	return t
}
