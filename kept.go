package pubsub

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
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
// the owner, while it still waits for the delivery, sends the messages
// after all; copies outlive that wait by far (keptFor). The store is
// bounded however fast a node publishes: past its bounds a request names
// no copy and its delivery carries the messages, as before.

const (
	maxKeptBytes  = 16 << 20 // bytes of the copies held at once
	maxKeptCopies = 1024     // copies held at once
	minKeptFor    = 2 * time.Minute
)

// keptFor is how long a node keeps a copy: far longer than the owner
// waits for the delivery (SubscriberTimeout + RequestTimeout/2, at-least-
// once re-sends included), because a delivery held up on a stalled route
// still arrives after the owner stopped waiting, and without its copy it
// could not run (its NOT_KEPT reaches nobody): a stall of 2.5 s past a
// 1.5 s lifetime lost batches at the publisher's own subscriber in 19 of
// 20 runs (TestKeptCopiesThroughARouteStall). The copies that no delivery
// names (a publish that failed, a subscriber gone meanwhile) wait out this
// time within the store's bounds, which then keeps no new ones.
func keptFor(cfg Config) time.Duration {
	return max(minKeptFor, 4*(cfg.SubscriberTimeout+cfg.RequestTimeout))
}

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

	hits, misses, skipped atomic.Uint64
}

type keptCopy struct {
	topic    string
	packed   []byte
	withMeta bool
	count    uint32
	at       time.Time
	taken    bool // by an at-least-once delivery: only its re-sends need it
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
// when withMeta) under id, and reports whether it did. A store at a bound
// keeps no more (after dropping the copies past ttl): the request is then
// sent naming no copy. Dropping an older copy instead would make room for
// this one at the cost of that one's delivery, still on its way: answered
// NOT_KEPT, it is sent again a round trip later, after the owner's later
// batches, and dropped by the subscribers as late (OutOfOrder).
func (k *keptCopies) keep(id uint64, topic string, packed []byte, withMeta bool, count uint32) bool {
	c := &keptCopy{topic: topic, packed: slices.Clone(packed), withMeta: withMeta, count: count, at: time.Now()}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.trimLocked(c.at)
	old := k.byID[id]
	bytes, copies := k.bytes+len(c.packed), len(k.byID)+1
	if old != nil {
		bytes, copies = bytes-len(old.packed), copies-1
	}
	// Copies an at-least-once delivery took already serve only its
	// re-sends, which a NOT_KEPT costs nothing but the messages: the
	// node's mailboxes have the batch. They make room first.
	for i := 0; i < len(k.order) && (bytes > k.maxBytes || copies > k.maxCopies); i++ {
		if t := k.byID[k.order[i]]; t != nil && t.taken && k.order[i] != id {
			delete(k.byID, k.order[i])
			bytes, copies = bytes-len(t.packed), copies-1
			k.bytes -= len(t.packed)
		}
	}
	if bytes > k.maxBytes || copies > k.maxCopies {
		return false
	}
	if old == nil {
		k.order = append(k.order, id)
	}
	k.byID[id] = c
	k.bytes = bytes
	return true
}

// trimLocked drops the copies past ttl from the oldest, and forgets the
// numbers of copies taken or dropped meanwhile, so that order stays within
// 2 * maxCopies.
func (k *keptCopies) trimLocked(now time.Time) {
	for len(k.order) > 0 {
		id := k.order[0]
		c := k.byID[id]
		if c != nil && now.Sub(c.at) <= k.ttl {
			break
		}
		if c != nil {
			delete(k.byID, id)
			k.bytes -= len(c.packed)
		}
		k.order[0] = 0
		k.order = k.order[1:]
	}
	if len(k.order) >= 2*k.maxCopies {
		// Mostly numbers of copies taken since (at most maxCopies are
		// held): the list is rebuilt with those held.
		order := make([]uint64, 0, len(k.byID))
		seen := make(map[uint64]bool, len(k.byID))
		for _, id := range k.order {
			if k.byID[id] != nil && !seen[id] {
				seen[id] = true
				order = append(order, id)
			}
		}
		k.order = order
	}
	if len(k.order) == 0 {
		k.order = nil // let the backing array go
	}
}

// take returns the messages kept under ids, one copy after the other, for
// a delivery of count messages to topic, dropping the copies when once (no
// copy of the delivery can follow). ok is false unless every copy is held
// (within ttl), of topic, and their counts add up to count; several copies
// (an owner's merge of consecutive requests) must all be in format 1, as
// merges are.
func (k *keptCopies) take(ids []uint64, topic string, count uint32, once bool) (packed []byte, withMeta, ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var sum uint64
	size := 0
	ok = len(ids) > 0
	for _, id := range ids {
		c := k.byID[id]
		if c == nil || c.topic != topic || time.Since(c.at) > k.ttl || (len(ids) > 1 && c.withMeta) {
			ok = false
			break
		}
		sum += uint64(c.count)
		size += len(c.packed)
	}
	if !ok || sum != uint64(count) {
		k.misses.Add(1)
		return nil, false, false
	}
	k.hits.Add(1)
	if len(ids) == 1 {
		c := k.byID[ids[0]]
		packed, withMeta = c.packed, c.withMeta
	} else {
		packed = make([]byte, 0, size)
		for _, id := range ids {
			packed = append(packed, k.byID[id].packed...)
		}
	}
	for _, id := range ids {
		if c := k.byID[id]; c != nil && once { // a forged list may name one twice
			delete(k.byID, id)
			k.bytes -= len(c.packed)
		} else if c != nil {
			c.taken = true
		}
	}
	return packed, withMeta, true
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
	if !n.publisher.kept.keep(p.wire.KeptCopy, topic, packed, withMeta, p.wire.GetCount()) {
		// No room: the owner sends these messages back (see keep).
		n.keptSkipped(topic)
		p.wire.KeptCopy = 0
		return req.encode(v, owner.Incarnation, out[:0])
	}
	return out
}

// keptSkipped counts and logs (throttled) a publish sent naming no kept
// copy because the store was at its bound: nothing is lost, but its
// messages cross the servers back to this node.
func (n *Node) keptSkipped(topic string) {
	n.publisher.kept.skipped.Add(1)
	if ok, suppressed := n.log.limit.allow("kept/full"); ok {
		k := &n.publisher.kept
		k.mu.Lock()
		copies, bytes, maxCopies, maxBytes := len(k.byID), k.bytes, k.maxCopies, k.maxBytes
		k.mu.Unlock()
		n.log.Warn("kept-copy store full: publish sent without a kept copy (the owner sends its messages back)", "topic", topic,
			"copies", copies, "bytes", bytes, "limit_copies", maxCopies, "limit_bytes", maxBytes, "suppressed", suppressed)
	}
}

// answered forgets req's copy once an AckDelivered answer came that
// every subscriber had reported before: the owner's delivery to this node,
// and any at-least-once copy of it, was over by then (one merely in flight
// is answered NOT_KEPT and sent with its messages, which the node then
// drops as a copy of what it ran). Not after an answer sent at the
// publisher's deadline (subscribers unreported): the delivery may not have
// arrived yet, and sent again after the owner's later batches it would be
// dropped as late. Nor when a subscriber of this node timed out: the owner
// stopped waiting for the node's report, and the delivery may still sit in
// this node's inbox (behind a slow hook, say); its copy ages out. Other
// levels are answered before the delivery: their copy is taken by it, or
// ages out.
func (n *Node) answered(req ownerRequest, ans ownerAnswer) {
	if ans.code != wire.Reply_OK || len(ans.unreported) > 0 {
		return
	}
	for _, f := range ans.ack.Failures {
		if f.Status == Timeout && f.Subscriber.Node == n.self.ID {
			return
		}
	}
	if p, ok := req.(*publishRequest); ok && p.wire.GetKeptCopy() != 0 && AckLevel(p.wire.GetAckLevel()) == AckDelivered {
		n.publisher.kept.drop(p.wire.GetKeptCopy())
	}
}
