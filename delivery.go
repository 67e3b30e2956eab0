package pubsub

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// onDeliver handles a DeliverBatch from a remote owner.
func (n *Node) onDeliver(d *wire.DeliverBatch, reply string) {
	report := func(st []DeliveryStatus, processed, behind []uint32) *wire.Reply {
		rep := &wire.Reply{Code: wire.Reply_OK, Statuses: make([]uint32, len(st)), Processed: processed, Behind: behind}
		for i, s := range st {
			rep.Statuses[i] = uint32(s)
		}
		return rep
	}
	if len(d.GetProducer()) > maxProducerIDLen || len(d.GetOwner().GetNodeId()) > natsutil.MaxNodeIDLen || len(d.GetTopic()) > natsutil.MaxTopicLen {
		// Names longer than any node, topic or producer has: what the
		// subscriptions and the at-least-once batches remember by them
		// must stay bounded in bytes.
		n.malformed("inbox", len(d.GetPacked())+len(d.GetPackedMeta()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "name too long"})
		return
	}
	if n.members.sameID.superseded.Load() && !n.subscriber.namesOwn(d) {
		// A newer incarnation of this node's ID runs (this one was cut
		// off past MemberTimeout and replaced): deliveries to the ID's
		// inbox reach both, and this node's SubscriberGone for the other's
		// subscribers, if it came first, made the owner drop them while
		// they lived. Only the incarnation that made them answers. (An
		// owner that names the incarnation it registered them under is
		// answered by that one alone, see onInbox: right after the heal
		// this node may not have heard the newer one yet.)
		return
	}
	packed, packedMeta := d.GetPacked(), d.GetPackedMeta()
	if ids := d.GetKeptCopy(); len(ids) > 0 {
		// This node published the batch and kept a copy (kept.go).
		if len(packed) > 0 || len(packedMeta) > 0 {
			n.malformed("inbox", len(packed)+len(packedMeta))
			n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "a kept copy and messages"})
			return
		}
		if to := d.GetToIncarnation(); to != 0 && to != n.self.Incarnation {
			// Meant for an older incarnation of this ID (a newer one is
			// not answered at all: onInbox), whose subscribers are gone
			// here, as they are for a delivery with its messages. A
			// NOT_KEPT would make the owner send the batch again, to the
			// older one too if it still runs.
			n.replyTo(reply, report(fill(len(d.GetSubscribers())+len(d.GetShares()), SubscriberGone), nil, nil))
			return
		}
		kept, withMeta, ok := n.publisher.kept.take(ids, d.GetTopic(), d.GetCount(), !d.GetAtLeastOnce())
		if !ok {
			// The owner sends the messages if it still waits: a delivery
			// held up past the copy's time (kept.go: keptFor) is lost. An
			// at-least-once re-send of a delivery that took its copy is
			// not (the first ran here): debug only.
			level := slog.LevelWarn
			if d.GetAtLeastOnce() {
				level = slog.LevelDebug
			}
			if ok, held := n.log.limit.allow("kept/miss"); ok {
				n.log.Log(context.Background(), level, "delivery of a batch this node published found no kept copy: answered NOT_KEPT", "topic", d.GetTopic(), "copies", len(ids), "suppressed", held)
			}
			n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_KEPT})
			return
		}
		if withMeta {
			packedMeta = kept
		} else {
			packed = kept
		}
	}
	msgs, err := receivedPayload(packed, packedMeta, d.GetCount())
	if err != nil {
		n.malformed("inbox", len(d.GetPacked())+len(d.GetPackedMeta()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: err.Error()})
		return
	}
	shares, ok := sharesFromWire(d.GetShares(), d.GetSubscribers(), msgs.count)
	if !ok {
		n.malformed("inbox", len(d.GetPacked())+len(d.GetPackedMeta()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "share index past the batch"})
		return
	}
	msgs.publisher = d.GetPublisher()
	// The owner waits for this node's report about its own
	// SubscriberTimeout (+ RequestTimeout/2): with a longer one here, the
	// report would come too late, every subscriber here (a healthy one
	// beside a blocked one too) would count as Timeout, and a blocked
	// subscriber would never be evicted, since an unreported node's Timeout
	// never counts. The shorter of the two applies.
	timeout := n.cfg.SubscriberTimeout
	if ms := d.GetSubscriberTimeoutMs(); ms > 0 {
		timeout = min(timeout, time.Duration(ms)*time.Millisecond)
	}
	if !d.GetReroute() {
		msgs.origin = batchOrigin{producer: d.GetProducer(), seq: d.GetProducerSeq(), atLeastOnce: d.GetAtLeastOnce(),
			split: splitChunk{id: d.GetSplitId(), index: d.GetSplitChunk()}}
		msgs.seq = batchSeq{owner: d.GetOwner().GetNodeId(), inc: d.GetOwner().GetIncarnation(), seq: d.GetSeq()}
	} else if d.GetProducer() != "" {
		// A re-routed share is taken whatever batches its member already
		// had; its producer number only answers a copy of it (the batch
		// retried, the share re-routed again) with its outcome.
		msgs.origin = batchOrigin{producer: d.GetProducer(), seq: d.GetProducerSeq(), reroute: true}
	}
	if !d.GetAtLeastOnce() || d.GetReroute() { // a re-route is sent once
		n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed, behind []uint32) { n.replyTo(reply, report(st, processed, behind)) })
		return
	}
	// At-least-once: the owner re-sends a batch it got no report for. Every
	// copy is answered, but the batch reaches the mailboxes once.
	key := batchKey{owner: d.GetOwner().GetNodeId(), inc: d.GetOwner().GetIncarnation(), topic: d.GetTopic(), seq: d.GetSeq(),
		part: partOf(d)}
	n.subscriber.recentMu.Lock()
	if rb := n.subscriber.recent[key]; rb != nil {
		if rb.report == nil {
			if len(rb.replies) >= maxWaitingCopies {
				// The owner sends a handful of copies while a batch runs
				// (one per SubscriberTimeout/4): more are a forged flood,
				// which must not grow the list. Unanswered, a real copy
				// is sent again.
				n.subscriber.recentMu.Unlock()
				n.stats.refused.Add(1)
				if ok, held := n.log.limit.allow("recent/copies"); ok {
					n.log.Warn("at-least-once batch copy dropped: too many copies wait for its report", "topic", d.GetTopic(), "limit", maxWaitingCopies, "suppressed", held)
				}
				return
			}
			rb.replies = append(rb.replies, reply)
			n.subscriber.recentMu.Unlock()
			return
		}
		rep := rb.report
		n.subscriber.recentMu.Unlock()
		n.replyTo(reply, rep)
		return
	}
	rb := &recentBatch{replies: []string{reply}, at: time.Now()}
	if len(n.subscriber.recent) >= maxRecentBatches {
		// Remembering more would let any sender grow the map: this batch is
		// delivered without duplicate suppression, and that is logged.
		n.subscriber.recentMu.Unlock()
		if ok, held := n.log.limit.allow("recent/full"); ok {
			n.log.Warn("at-least-once duplicate suppression full: delivering without it", "limit", maxRecentBatches, "suppressed", held)
		}
		n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed, behind []uint32) { n.replyTo(reply, report(st, processed, behind)) })
		return
	}
	n.subscriber.recent[key] = rb
	n.subscriber.recentMu.Unlock()
	n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed, behind []uint32) {
		rep := report(st, processed, behind)
		n.subscriber.recentMu.Lock()
		rb.report = rep
		replies := rb.replies
		rb.replies = nil
		n.subscriber.recentMu.Unlock()
		for _, r := range replies {
			n.replyTo(r, rep)
		}
	})
}

// batchKey identifies one node's part of one batch of one owner
// incarnation. A node's subscriber list too long for one message goes in
// several parts with the batch's number (sendRemote): without the part,
// a later part was answered with the first part's report, its subscribers
// counted Delivered without running.
type batchKey struct {
	owner string
	inc   uint64
	topic string
	seq   uint64
	part  uint64 // hash of the part's subscribers and shares
}

// partOf hashes the subscribers a DeliverBatch names: every copy of one
// part names the same ones, in the same order.
func partOf(d *wire.DeliverBatch) uint64 {
	h := uint64(fnvOffset)
	for _, l := range d.GetSubscribers() {
		h = fnvString(fnvString(h, l), "\x00")
	}
	for _, sh := range d.GetShares() {
		h = fnvString(fnvString(h, sh.GetSubscriber()), "\x01")
	}
	return h
}

// maxRecentBatches bounds the at-least-once batches remembered for duplicate
// suppression (each for 2 x (SubscriberTimeout + RequestTimeout)).
const maxRecentBatches = 1 << 16

// maxWaitingCopies bounds the copies of one at-least-once batch that wait
// for its report; past it a copy is dropped, counted in
// Stats().RequestsRefused.
const maxWaitingCopies = 64

// recentBatch remembers an at-least-once batch so copies are not delivered twice.
type recentBatch struct {
	replies []string    // waiting for the report
	report  *wire.Reply // set once every subscriber finished
	at      time.Time
}

// deliver puts one batch in the mailbox of each listed local subscriber and
// calls done once with one status per subscriber, with processed (nil
// unless a subscription ended partway through its messages: how many it
// ran, per status) and with behind (the subscribers that dropped it as
// OutOfOrder by its owner's batch number, batchTracker.setBehind). It never blocks: a full mailbox is a MailboxFull
// failure, not back-pressure on the inbox.
//
// Group members get their shares instead (the messages at the share's
// indices); their statuses follow the locals'.
func (n *Node) deliver(topic string, locals []string, shares []share, msgs payload, done func(st []DeliveryStatus, processed, behind []uint32)) {
	n.deliverWithin(n.cfg.SubscriberTimeout, topic, locals, shares, msgs, done)
}

// deliverWithin is deliver with subscribers given timeout, not
// necessarily this node's SubscriberTimeout, to run the batch.
func (n *Node) deliverWithin(timeout time.Duration, topic string, locals []string, shares []share, msgs payload, done func(st []DeliveryStatus, processed, behind []uint32)) {
	count := len(locals) + len(shares)
	t := &batchTracker{statuses: make([]DeliveryStatus, count), remaining: count, done: done}
	for i := range t.statuses {
		t.statuses[i] = statusPending
	}
	if count == 0 {
		done(t.statuses, nil, nil)
		return
	}
	ctx, cancel := context.WithTimeout(n.life.ctx, timeout)
	// The deadline reports every subscriber still busy as Timeout; the
	// handler keeps its goroutine, so only its own mailbox waits for it.
	t.mu.Lock()
	t.cancel = cancel
	t.stop = context.AfterFunc(ctx, t.expire)
	t.mu.Unlock()
	// One Message per message for all of this node's subscribers, in a
	// leased slice (messageLease): handlers see them read-only, so they
	// can share them. Group members alone need only their shares: the
	// owner's own members' are built from the unpacked batch without the
	// rest.
	var lease *messageLease
	if len(locals) > 0 || msgs.msgs.data == nil {
		lease = msgs.messages(topic)
		defer lease.release() // the hold taken here: each item takes its own
	}
	// Outcomes decided here, for the hooks, which run once the lock is
	// released.
	var decided []decidedOutcome
	var forgotShares, forgotSplits int // counted past the lock, as the hooks run
	// Statuses decided here are set past the lock too: the last one runs
	// the batch's done, which on the owner's node may re-route a share to
	// a member here, delivering again. Taken again inside, the read lock
	// would deadlock with a Subscribe waiting for the write lock between.
	var setLater []decidedStatus
	n.subscriber.mu.RLock()
	for i := range count {
		// its holds the Messages subscriber i runs, once, for its mailbox
		// item, which releases them when it has run.
		var l string
		var its *messageLease
		if i < len(locals) {
			l, its = locals[i], lease
			its.hold()
		} else {
			sh := shares[i-len(locals)]
			l, its = sh.local, msgs.shareMessages(topic, lease, sh.idx)
		}
		part := its.msgs
		s := n.subscriber.subs[l]
		if s == nil || s.topic != topic {
			its.release()
			setLater = append(setLater, decidedStatus{i, SubscriberGone})
			if len(n.hooks.handled) != 0 {
				decided = append(decided, decidedOutcome{SubscriberID{Node: n.self.ID, Local: l}, len(part), SubscriberGone})
			}
			continue
		}
		queued := hookClock(n.hooks.handled)
		origin := msgs.origin
		member := i >= len(locals) // a group member's share
		if origin.reroute && member {
			// Two members' shares of one batch re-routed to the same
			// member are not copies of each other, even when their
			// messages are equal: the positions tell them apart.
			origin.at = positionsMark(shares[i-len(locals)].idx)
		}
		if member && s.refused.has(origin) || !s.mailbox.do(func() {
			s.handle(ctx, part, origin, msgs.seq, t, i, queued)
			its.release()
		}) {
			its.release()
			if member {
				if s.refused.note(origin) {
					forgotShares++
				}
			} else if s.noteRefusedSplit(origin.split) {
				forgotSplits++
			}
			setLater = append(setLater, decidedStatus{i, MailboxFull})
			if len(n.hooks.handled) != 0 {
				decided = append(decided, decidedOutcome{s.id, len(part), MailboxFull})
			}
		}
	}
	n.subscriber.mu.RUnlock()
	for _, r := range setLater {
		t.set(r.i, r.status)
	}
	for range forgotShares {
		n.forgotMark("producers/refused-shares")
	}
	for range forgotSplits {
		n.forgotMark("producers/split-refused")
	}
	for _, d := range decided {
		n.handled(topic, d.id, d.messages, d.status, 0, 0)
	}
}

// onEvict ends a local subscription its owner evicted. An empty one is
// Join's permission probe (checkPermissions), answered as before; one
// naming no valid topic otherwise (which would match a subscription of any
// topic) is malformed; a status this version cannot name (a newer owner's)
// reads HandlerError.
func (n *Node) onEvict(e *wire.Evict, reply string) {
	if e.GetTopic() == "" && e.GetSubscriber() == "" {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK})
		return
	}
	if validateTopic(e.GetTopic()) != nil {
		n.malformed("evict", len(e.GetTopic()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid evict: no valid topic"})
		return
	}
	status := DeliveryStatus(e.GetStatus())
	if e.GetStatus() > uint32(lastDeliveryStatus) {
		status = HandlerError
	}
	n.evictLocal(e.GetTopic(), e.GetSubscriber(), status)
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK})
}

func (n *Node) evictLocal(topic, local string, status DeliveryStatus) {
	s := n.subscriber.remove(local, topic)
	if s == nil {
		return
	}
	n.log.Info("subscriber evicted", "topic", topic, "subscriber", s.id.String(), "status", status.String())
	if n.life.closeCalled.Load() {
		// Evicted while its node drains its Close: the node closed it, as
		// Close promises for every local subscription; subscribing again
		// is no remedy there. The failure is still named.
		why := fmt.Sprintf("its owner evicted it for %s", status)
		if status == Timeout || status == MailboxFull {
			why = fmt.Sprintf("it was behind: its owner evicted it (last failure: %s)", status)
		}
		s.end(fmt.Errorf("%w: node %s closed while %s of topic %q ran; %s", ErrClosed, n.self.ID, s.id, topic, why))
	} else {
		// Name the topic and the failure, and say what a subscriber can
		// do: the owner will not take it back on its own.
		s.end(fmt.Errorf("%w: %s from topic %q (last failure: %s); Subscribe again to receive the topic's messages", ErrEvicted, s.id, topic, status))
	}
	emit(n.events, SubscriberEvicted{Topic: topic, Subscriber: s.id, Group: s.id.Group(), Status: status})
}

// notifyEvicted tells the subscriber's node (by message, or directly when
// local) that the owner removed it.
func (n *Node) notifyEvicted(topic string, id SubscriberID, status DeliveryStatus) {
	n.log.Info("evicting subscriber", "topic", topic, "subscriber", id.String(), "status", status.String())
	n.stats.evicted.Add(1)
	if id.Node == n.self.ID {
		n.evictLocal(topic, id.Local, status)
		return
	}
	m, ok := n.view().member(id.Node)
	if !ok {
		return
	}
	// Acknowledged and retried: a lost notice would leave the subscription
	// believing it is active, and the node would re-register it at the next
	// view change.
	env := &wire.Envelope{Body: &wire.Envelope_Evict{Evict: &wire.Evict{
		Owner: n.selfRef(), Topic: topic, Subscriber: id.Local, Status: uint32(status)}}}
	n.life.goroutines.add()
	go func() {
		defer n.life.goroutines.done()
		n.retry(n.life.ctx, func() bool {
			if !n.view().holds(m) {
				return true // the node is gone, and its subscriptions with it
			}
			_, err := n.rpc.callEnvelope(n.life.ctx, m.Inbox, env, callOpts{timeout: n.cfg.RequestTimeout})
			return err == nil
		})
	}()
}

// timeoutMillis is d in DeliverBatch.subscriber_timeout_ms: whole
// milliseconds, rounded up (truncated, a subscriber's node with the same
// SubscriberTimeout would cut its subscribers off before the owner's local
// ones), at least 1 (0 says nothing), at most what the field holds.
func timeoutMillis(d time.Duration) uint32 {
	ms := d.Milliseconds()
	if d%time.Millisecond > 0 {
		ms++
	}
	return uint32(min(max(ms, 1), math.MaxUint32))
}
