package pubsub

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Publisher-side merging of AckNone publishes. A loop of AckNone publishes
// cost the publishing node, per call, a request encoded and written (most
// of it allocations and the protobuf head, not the NATS write, which only
// fills the connection's buffer), and the servers, the owner and the
// subscriber nodes a NATS message each. A plain AckNone publish (no
// producer, no key or header, one request's worth) to a topic another node
// owns is therefore appended, copied and packed, to the topic's outbox and
// the call returns: accepted locally, like a publish queued on a local
// owner's actor. A flusher, a goroutine that exists only while the outbox
// holds messages, takes what accumulated while the previous request was
// written and writes it, one request per run of up to runBytes, numbered
// by the node's implicit producer like any plain publish. A publishing loop
// thus fills the next run while the flusher writes one; nothing waits on a
// timer. A caller that finds a whole run waiting and nothing being written
// (the flusher not scheduled yet) writes it itself.
//
// Order. The outbox's requests and every other plain publish to the topic
// take the outbox's sending token before their numbers, and hold it until
// written: another publish to the topic (another level, a header, a split
// batch, a local owner) first writes what the outbox holds, so a caller's
// publishes leave in the order of its calls.
//
// Bounds. An outbox holds at most outboxLimits messages and bytes, counting
// a request being written until it is: a call that would pass them waits,
// within its ctx, for the request being written, then writes what the
// outbox holds itself (ErrQueueFull when its ctx ends first): a loop faster
// than the writes is slowed to their pace, as a NATS publish is by its
// full buffer. The node's outboxes together hold at most 1 024 topics and
// 64 MiB; past that a publish to a topic without an outbox is written by its
// caller. A run that cannot be written (no owner within RequestTimeout,
// the owner's queue full when the topic moved to this node, the node
// stopped) is counted in Rejected, emitted as PublishRejected and logged,
// and the runs held behind it fail at once with it: the sending token is
// held for one RequestTimeout, not one per run. A run is at most the
// node's MaxMessageSize, whatever runBytes says.
//
// Close writes what the outboxes hold before it leaves; a node stopped by
// the loss of its connection drops it (counted).

// outboxLimits bound one topic's outbox (msgs, bytes) and all of a node's
// (nodeBytes, boxes). Past the node's, a publish to a topic without an
// outbox takes the direct path, written by the caller as before merging
// existed: many topics each with a message or two cost no more than that.
type outboxLimits struct {
	msgs, bytes      int
	nodeBytes, boxes int
}

var defaultOutboxLimits = outboxLimits{msgs: maxActorQueue, bytes: 16 << 20, nodeBytes: 64 << 20, boxes: 1024}

// outboxes are this node's outboxes, one per topic that has messages
// waiting or being written; an idle one is forgotten.
type outboxes struct {
	mu     sync.Mutex
	boxes  map[string]*outbox
	limits outboxLimits
	live   atomic.Int64 // len(boxes): a plain publish skips the lookup at 0
	held   atomic.Int64 // bytes held by every outbox
}

// outbox holds a topic's merged AckNone publishes until they are written.
type outbox struct {
	topic string
	held  *atomic.Int64 // the node's outboxes' bytes, shared
	// sending holds a token while what the outbox took, or another
	// plain publish to the topic, is numbered and written.
	sending chan struct{}

	mu      sync.Mutex
	full    []outboxRun // runs of one request each, oldest first
	cur     outboxRun   // the run being filled
	msgs    int         // messages held, in full, cur and being written
	bytes   int         // their packed bytes
	running bool        // a flusher goroutine runs
	dead    bool        // forgotten: look the topic up again
}

// outboxRun is messages packed for one request.
type outboxRun struct {
	packed []byte
	count  int
}

func (o *outboxes) init() { o.limits = defaultOutboxLimits }

// get returns topic's outbox, creating it unless the node holds
// limits.boxes outboxes or limits.nodeBytes bytes already (then nil).
func (o *outboxes) get(topic string) *outbox {
	o.mu.Lock()
	defer o.mu.Unlock()
	ob := o.boxes[topic]
	if ob == nil {
		if len(o.boxes) >= o.limits.boxes || int(o.held.Load()) >= o.limits.nodeBytes {
			return nil
		}
		if o.boxes == nil {
			o.boxes = make(map[string]*outbox)
		}
		ob = &outbox{topic: topic, sending: make(chan struct{}, 1), held: &o.held}
		o.boxes[topic] = ob
		o.live.Add(1)
	}
	return ob
}

// lookup returns topic's outbox, or nil.
func (o *outboxes) lookup(topic string) *outbox {
	if o.live.Load() == 0 {
		return nil // no AckNone publish is held: the common case costs no lock
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.boxes[topic]
}

// all returns every outbox.
func (o *outboxes) all() []*outbox {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]*outbox, 0, len(o.boxes))
	for _, ob := range o.boxes {
		out = append(out, ob)
	}
	return out
}

// forgetIfIdle drops ob from the map when it holds nothing and no flusher
// runs: a topic anyone can name must not cost memory for good.
func (o *outboxes) forgetIfIdle(ob *outbox) {
	o.mu.Lock()
	defer o.mu.Unlock()
	ob.mu.Lock()
	defer ob.mu.Unlock()
	if ob.dead || ob.running || ob.msgs > 0 || o.boxes[ob.topic] != ob {
		return
	}
	ob.dead = true
	delete(o.boxes, ob.topic)
	o.live.Add(-1)
}

// runBytes is the size of an outbox's run, one request: large enough that
// a request's cost is spread over hundreds of small messages, small enough
// that the owner and the subscribers work on one run while the next fills.
// A batch larger than that has a run of its own, as large as it.
const runBytes = 64 << 10

// smallRun is the first buffer of a run in an outbox that had no full run:
// a topic published to now and then holds a few hundred bytes, not 64 KiB.
const smallRun = 2 << 10

// runBufs recycles full-size runs' buffers: a request's bytes are copied
// when it is written (or, for a local owner, by detach).
var runBufs = sync.Pool{New: func() any { b := make([]byte, 0, runBytes); return &b }}

// newRun returns an empty buffer for a run that starts with size bytes:
// a pooled full-size one when the outbox is busy (its previous run
// filled), else a small one that append grows as needed.
func newRun(size int, busy bool) []byte {
	switch {
	case size > runBytes:
		return make([]byte, 0, size)
	case busy:
		return (*runBufs.Get().(*[]byte))[:0]
	default:
		return make([]byte, 0, max(size, smallRun))
	}
}

// freeRun recycles a run's buffer once its request is written.
func freeRun(b []byte) {
	if cap(b) == runBytes {
		b = b[:0]
		runBufs.Put(&b)
	}
}

// packedLen is the size of data packed: uvarint length and bytes.
func packedLen(data []byte) int {
	n := len(data) + 1
	for x := len(data) >> 7; x != 0; x >>= 7 {
		n++
	}
	return n
}

// publishMerged appends a plain AckNone batch (no keys or headers, small
// enough for one request) to topic's outbox. handled is false when the
// topic's owner in this node's view is this node or nobody: the batch then
// takes the usual path. A full outbox makes the call wait, within ctx, for
// the request being written, and write what the outbox holds itself.
func (n *Node) publishMerged(ctx context.Context, topic string, batch msgBatch) (handled bool, err error) {
	owner := n.view().ownerOf(topic)
	if owner.ID == "" || owner.ID == n.self.ID || n.life.closeCalled.Load() {
		// Once Close began, the caller writes its own publish: what an
		// outbox took now might still be held when the node stops.
		return false, nil
	}
	size := 0
	for _, d := range batch.data {
		size += packedLen(d)
	}
	out := &n.publisher.out
	// A run is one request: it must fit the connection's payload limit as
	// well as runBytes.
	limit := min(runBytes, n.MaxMessageSize())
	for {
		ob := out.get(topic)
		if ob == nil {
			return false, nil // the node's outboxes are at their limit: write directly
		}
		ob.mu.Lock()
		if ob.dead {
			ob.mu.Unlock()
			continue
		}
		if n.life.closed.Load() {
			ob.mu.Unlock()
			return true, ErrClosed // no flusher may start once Close waited for them
		}
		if ob.msgs > 0 && (ob.msgs+batch.len() > out.limits.msgs || ob.bytes+size > out.limits.bytes ||
			int(out.held.Load())+size > out.limits.nodeBytes) {
			held, bytes := ob.msgs, ob.bytes
			ob.mu.Unlock()
			if err := n.hold(ctx, ob); err != nil {
				if errors.Is(err, ErrClosed) {
					return true, err
				}
				return true, fmt.Errorf("%w: the topic's outbox on this node holds %d messages (%d bytes), limit %d (%d bytes; %d bytes for all topics): %w",
					ErrQueueFull, held, bytes, out.limits.msgs, out.limits.bytes, out.limits.nodeBytes, err)
			}
			n.sendRuns(context.Background(), ob, ob.take(false))
			ob.unhold()
			continue
		}
		busy := len(ob.full) > 0
		if ob.cur.count > 0 && len(ob.cur.packed)+size > limit {
			ob.full = append(ob.full, ob.cur)
			ob.cur = outboxRun{}
			busy = true
		}
		if ob.cur.packed == nil {
			ob.cur.packed = newRun(size, busy)
		}
		for _, d := range batch.data {
			ob.cur.packed = binary.AppendUvarint(ob.cur.packed, uint64(len(d)))
			ob.cur.packed = append(ob.cur.packed, d...)
		}
		ob.cur.count += batch.len()
		ob.msgs += batch.len()
		ob.bytes += size
		out.held.Add(int64(size))
		start, help := !ob.running, len(ob.full) > 0
		ob.running = true
		ob.mu.Unlock()
		if start {
			n.life.goroutines.add()
			go n.runOutbox(ob)
		}
		if help && ob.tryHold() {
			// A whole request waits and nothing is being written (the
			// flusher has not run yet): write it now.
			n.sendRuns(context.Background(), ob, ob.take(false))
			ob.unhold()
		}
		return true, nil
	}
}

// take takes every run ob holds; with stop, a flusher finding none stops.
func (ob *outbox) take(stop bool) []outboxRun {
	ob.mu.Lock()
	defer ob.mu.Unlock()
	if ob.cur.count == 0 {
		if stop {
			ob.running = false
		}
		return nil
	}
	runs := append(ob.full, ob.cur)
	ob.full, ob.cur = nil, outboxRun{}
	return runs
}

// written releases what a taken run held.
func (ob *outbox) written(r outboxRun) {
	ob.mu.Lock()
	ob.msgs -= r.count
	ob.bytes -= len(r.packed)
	ob.mu.Unlock()
	ob.held.Add(-int64(len(r.packed)))
}

// hold takes ob's sending token, within ctx.
func (n *Node) hold(ctx context.Context, ob *outbox) error {
	select {
	case ob.sending <- struct{}{}:
		return nil
	default:
	}
	select {
	case ob.sending <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.life.ctx.Done():
		return ErrClosed
	}
}

// tryHold takes ob's sending token if it is free.
func (ob *outbox) tryHold() bool {
	select {
	case ob.sending <- struct{}{}:
		return true
	default:
		return false
	}
}

func (ob *outbox) unhold() { <-ob.sending }

// runOutbox is ob's flusher: it writes what accumulated, request after
// request, until ob is empty.
func (n *Node) runOutbox(ob *outbox) {
	defer n.life.goroutines.done()
	for {
		if err := n.hold(context.Background(), ob); err != nil {
			// The node stopped: nobody writes what is left.
			ob.mu.Lock()
			ob.running = false
			ob.mu.Unlock()
			n.sendRuns(context.Background(), ob, ob.take(false))
			return
		}
		runs := ob.take(true)
		if runs == nil {
			ob.unhold()
			n.publisher.out.forgetIfIdle(ob)
			return
		}
		n.sendRuns(context.Background(), ob, runs)
		ob.unhold()
	}
}

// flushOutbox writes what ob holds and returns with its sending token held
// (unhold releases it): the caller's own request, numbered next, leaves
// after them. ctx bounds the wait for the token; only Close's (send) also
// bounds the writes: a caller's ctx must not drop the messages of others.
func (n *Node) flushOutbox(ctx, send context.Context, ob *outbox) error {
	if err := n.hold(ctx, ob); err != nil {
		return err
	}
	n.sendRuns(send, ob, ob.take(false))
	return nil
}

// flushOutboxes writes what every outbox holds (Close, before the leave).
// It returns an error when ctx ended before some could be written: merged
// AckNone messages their publishers were told were accepted, lost (each
// counted and logged by sendRuns, or by shutdown for an outbox whose turn
// never came).
func (n *Node) flushOutboxes(ctx context.Context) error {
	unwritten := 0
	for _, ob := range n.publisher.out.all() {
		if err := n.hold(ctx, ob); err != nil {
			// Its flusher is writing: what it has not written when the
			// node stops is lost.
			unwritten += ob.pending()
			continue
		}
		unwritten += n.sendRuns(ctx, ob, ob.take(false))
		ob.unhold()
	}
	if unwritten > 0 && ctx.Err() != nil {
		return fmt.Errorf("writing merged AckNone publishes: %d messages not written when ctx ended (those lost are counted in Stats().Rejected): %w",
			unwritten, ctx.Err())
	}
	return nil
}

// pending is how many messages ob holds.
func (ob *outbox) pending() int {
	ob.mu.Lock()
	defer ob.mu.Unlock()
	return ob.msgs
}

// sendRuns writes runs, one request each, to the topic's owner, with
// sending held; ctx bounds a wait for an owner. A run that cannot be
// written is counted and reported as rejected: its callers were told it
// was accepted. It returns how many messages were lost so.
func (n *Node) sendRuns(ctx context.Context, ob *outbox, runs []outboxRun) (lost int) {
	var failed error // once a run could not be written, the others are not tried
	for _, r := range runs {
		var origin batchOrigin
		req := &publishRequest{
			wire:   &wire.PublishRequest{From: n.selfRef(), Topic: ob.topic, Count: uint32(r.count), AckLevel: uint32(AckNone)},
			origin: &origin,
			run:    r.packed,
		}
		err := failed
		switch {
		case err != nil:
		case n.life.closed.Load():
			err = ErrClosed
		default:
			// Each run waits at most RequestTimeout for an owner; after
			// a failure the rest fail at once, so the token (which other
			// publishes to the topic, and Close, wait for) is held for
			// one RequestTimeout, not one per run.
			_, err = n.toOwner(ctx, ob.topic, req, ownerCall{noAnswer: true,
				attempt: func() func() { return n.publisher.numberAttempt(ob.topic, &origin) }})
		}
		ob.written(r)
		freeRun(r.packed)
		if err != nil {
			failed = err
			lost += r.count
			_, err = n.reject(ob.topic, r.count, fmt.Errorf("pubsub: publish to %q: %d merged AckNone messages lost: %w", ob.topic, r.count, err))
			if ok, held := n.log.limit.allow("outbox/" + ob.topic); ok {
				n.log.Warn("merged AckNone publishes lost", "topic", ob.topic, "messages", r.count, "err", err, "suppressed", held)
			}
		}
	}
	return lost
}
