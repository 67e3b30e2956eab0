package pubsub

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Kept copies. A node that publishes to a topic it also subscribes to,
// through a remote owner, would get its own batch back: the owner delivers
// it to every node with subscribers, the publisher's included, so the
// messages cross the servers a third time. Instead the publisher keeps a
// copy of what it sent (PublishRequest.kept_copy), and the owner's delivery
// to it names the copy rather than carrying the messages
// (DeliverBatch.kept_copy). Everything else about that delivery is as
// before: the owner numbers the batch, picks the subscribers and collects
// their statuses. A node that no longer holds the copy answers NOT_KEPT and
// the owner sends the messages after all, so a copy is an optimisation
// that is never needed for correctness, and the store is bounded however
// fast a node publishes.

const (
	maxKeptBytes  = 16 << 20 // bytes of the copies held at once
	maxKeptCopies = 1024     // copies held at once
)

// keptCopies holds a node's copies of the batches it sent to remote owners
// of topics it subscribes to, oldest first, within maxBytes and maxCopies,
// each for at most ttl.
type keptCopies struct {
	mu    sync.Mutex
	next  uint64
	byID  map[uint64]*keptCopy
	order []uint64 // ids by age; names some already taken or dropped
	bytes int

	ttl                 time.Duration
	maxBytes, maxCopies int

	hits, misses atomic.Uint64
}

type keptCopy struct {
	topic    string
	packed   []byte
	withMeta bool
	count    uint32
	at       time.Time
}

func (k *keptCopies) init(ttl time.Duration) {
	k.byID = make(map[uint64]*keptCopy)
	k.ttl, k.maxBytes, k.maxCopies = ttl, maxKeptBytes, maxKeptCopies
	k.next = randomUint64() >> 16 // numbers not reused across incarnations
}

// reserve returns the number a request's copy is kept under: id when the
// request already had one (a retry sends the same messages), else a new
// one.
func (k *keptCopies) reserve(id uint64) uint64 {
	if id != 0 {
		return id
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.next++
	return k.next
}

// keep stores a copy of packed (a request's packed messages, in format 2
// when withMeta) under id, making room by dropping the oldest copies. A
// batch larger than the whole store is not kept: its owner gets NOT_KEPT
// and sends it.
func (k *keptCopies) keep(id uint64, topic string, packed []byte, withMeta bool, count uint32) {
	c := &keptCopy{topic: topic, packed: slices.Clone(packed), withMeta: withMeta, count: count, at: time.Now()}
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(packed) > k.maxBytes {
		return
	}
	if old := k.byID[id]; old != nil {
		k.bytes -= len(old.packed)
	} else {
		k.order = append(k.order, id)
	}
	k.byID[id] = c
	k.bytes += len(c.packed)
	k.trimLocked(c.at)
}

// trimLocked drops copies from the oldest while the store is past a bound
// or its oldest copy is past ttl, and forgets the numbers of copies taken
// or dropped meanwhile, so that order stays within 2 * maxCopies.
func (k *keptCopies) trimLocked(now time.Time) {
	for len(k.order) > 0 {
		id := k.order[0]
		c := k.byID[id]
		if c != nil && k.bytes <= k.maxBytes && len(k.byID) <= k.maxCopies && now.Sub(c.at) <= k.ttl && len(k.order) <= 2*k.maxCopies {
			break
		}
		if c != nil {
			delete(k.byID, id)
			k.bytes -= len(c.packed)
		}
		k.order[0] = 0
		k.order = k.order[1:]
	}
	if len(k.order) == 0 {
		k.order = nil // let the backing array go
	}
}

// take returns the copy kept under id for a delivery of count messages to
// topic, dropping it when once (no copy of the delivery can follow). ok is
// false when no such copy is held.
func (k *keptCopies) take(id uint64, topic string, count uint32, once bool) (packed []byte, withMeta, ok bool) {
	k.mu.Lock()
	c := k.byID[id]
	ok = c != nil && c.topic == topic && c.count == count
	if ok && once {
		delete(k.byID, id)
		k.bytes -= len(c.packed)
	}
	k.mu.Unlock()
	if !ok {
		k.misses.Add(1)
		return nil, false, false
	}
	k.hits.Add(1)
	return c.packed, c.withMeta, true
}

// drop forgets the copy kept under id: its publish was answered, and an
// AckDelivered answer comes after the delivery that used it.
func (k *keptCopies) drop(id uint64) {
	k.mu.Lock()
	if c := k.byID[id]; c != nil {
		delete(k.byID, id)
		k.bytes -= len(c.packed)
	}
	k.mu.Unlock()
}

// held returns the number of copies and their bytes.
func (k *keptCopies) held() (copies, bytes int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.byID), k.bytes
}

// encodeRequest encodes req for owner into buf. A publish to a topic this
// node subscribes to keeps a copy of its messages first, and names it.
func (n *Node) encodeRequest(v *view, owner Member, req ownerRequest, buf []byte) []byte {
	p, ok := req.(*publishRequest)
	if !ok {
		return req.encode(v, owner.Incarnation, buf)
	}
	topic := p.wire.GetTopic()
	if !n.subscriber.subscribes(topic) {
		p.wire.KeptCopy = 0
		return req.encode(v, owner.Incarnation, buf)
	}
	p.wire.KeptCopy = n.publisher.kept.reserve(p.wire.KeptCopy)
	out := req.encode(v, owner.Incarnation, buf)
	packed, withMeta := p.packedIn(out)
	n.publisher.kept.keep(p.wire.KeptCopy, topic, packed, withMeta, p.wire.GetCount())
	return out
}

// answered forgets req's copy once its AckDelivered answer came: the
// owner's delivery to this node was over by then (or, answered early at
// the publisher's deadline, still runs and gets NOT_KEPT if it asks
// again, which costs a re-send of the messages, not a loss). Other levels
// are answered before the delivery: their copy is taken by it, or ages
// out.
func (n *Node) answered(req ownerRequest) {
	if p, ok := req.(*publishRequest); ok && p.wire.GetKeptCopy() != 0 && AckLevel(p.wire.GetAckLevel()) == AckDelivered {
		n.publisher.kept.drop(p.wire.GetKeptCopy())
	}
}
