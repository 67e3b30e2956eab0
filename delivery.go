package pubsub

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// onDeliver handles a DeliverBatch from a remote owner.
func (n *Node) onDeliver(d *wire.DeliverBatch, reply string) {
	report := func(st []DeliveryStatus, processed []uint32) *wire.Reply {
		rep := &wire.Reply{Code: wire.Reply_OK, Statuses: make([]uint32, len(st)), Processed: processed}
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
	if n.members.superseded.Load() && !n.subscriber.namesOwn(d) {
		// A newer incarnation of this node's ID runs (this one was cut
		// off past MemberTimeout and replaced): deliveries to the ID's
		// inbox reach both, and this node's SubscriberGone for the other's
		// subscribers, if it came first, made the owner drop them while
		// they lived. Only the incarnation that made them answers.
		return
	}
	msgs, err := receivedPayload(d.GetPacked(), d.GetPackedMeta(), d.GetCount())
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
		msgs.origin = batchOrigin{producer: d.GetProducer(), seq: d.GetProducerSeq(), atLeastOnce: d.GetAtLeastOnce()}
		msgs.seq = batchSeq{owner: d.GetOwner().GetNodeId(), inc: d.GetOwner().GetIncarnation(), seq: d.GetSeq()}
	} else if d.GetProducer() != "" {
		// A re-routed share is taken whatever batches its member already
		// had; its producer number only answers a copy of it (the batch
		// retried, the share re-routed again) with its outcome.
		msgs.origin = batchOrigin{producer: d.GetProducer(), seq: d.GetProducerSeq(), reroute: true}
	}
	if !d.GetAtLeastOnce() || d.GetReroute() { // a re-route is sent once
		n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed []uint32) { n.replyTo(reply, report(st, processed)) })
		return
	}
	// At-least-once: the owner re-sends a batch it got no report for. Every
	// copy is answered, but the batch reaches the mailboxes once.
	key := batchKey{owner: d.GetOwner().GetNodeId(), inc: d.GetOwner().GetIncarnation(), topic: d.GetTopic(), seq: d.GetSeq(),
		part: partOf(d)}
	n.subscriber.recentMu.Lock()
	if rb := n.subscriber.recent[key]; rb != nil {
		if rb.report == nil {
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
		n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed []uint32) { n.replyTo(reply, report(st, processed)) })
		return
	}
	n.subscriber.recent[key] = rb
	n.subscriber.recentMu.Unlock()
	n.deliverWithin(timeout, d.GetTopic(), d.GetSubscribers(), shares, msgs, func(st []DeliveryStatus, processed []uint32) {
		rep := report(st, processed)
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

// recentBatch remembers an at-least-once batch so copies are not delivered twice.
type recentBatch struct {
	replies []string    // waiting for the report
	report  *wire.Reply // set once every subscriber finished
	at      time.Time
}

// deliver puts one batch in the mailbox of each listed local subscriber and
// calls done once with one status per subscriber, and with processed (nil
// unless a subscription ended partway through its messages: how many it
// ran, per status). It never blocks: a full mailbox is a MailboxFull
// failure, not back-pressure on the inbox.
//
// Group members get their shares instead (the messages at the share's
// indices); their statuses follow the locals'.
func (n *Node) deliver(topic string, locals []string, shares []share, msgs payload, done func(st []DeliveryStatus, processed []uint32)) {
	n.deliverWithin(n.cfg.SubscriberTimeout, topic, locals, shares, msgs, done)
}

// deliverWithin is deliver with subscribers given timeout, not
// necessarily this node's SubscriberTimeout, to run the batch.
func (n *Node) deliverWithin(timeout time.Duration, topic string, locals []string, shares []share, msgs payload, done func(st []DeliveryStatus, processed []uint32)) {
	count := len(locals) + len(shares)
	t := &batchTracker{statuses: make([]DeliveryStatus, count), remaining: count, done: done}
	for i := range t.statuses {
		t.statuses[i] = statusPending
	}
	if count == 0 {
		done(t.statuses, nil)
		return
	}
	ctx, cancel := context.WithTimeout(n.life.ctx, timeout)
	// The deadline reports every subscriber still busy as Timeout; the
	// handler keeps its goroutine, so only its own mailbox waits for it.
	t.mu.Lock()
	t.cancel = cancel
	t.stop = context.AfterFunc(ctx, t.expire)
	t.mu.Unlock()
	// One Message per message for all of this node's subscribers: handlers
	// see them read-only, so they can share them. Group members alone need
	// only their shares: the owner's own members' are built from the
	// unpacked batch without the rest.
	var batch []Message
	if len(locals) > 0 || msgs.msgs.data == nil {
		batch = msgs.messages(topic)
	}
	// Outcomes decided here, for the hooks, which run once the lock is
	// released.
	var decided []decidedOutcome
	n.subscriber.mu.RLock()
	for i := range count {
		l, part := "", batch
		if i < len(locals) {
			l = locals[i]
		} else {
			sh := shares[i-len(locals)]
			l, part = sh.local, msgs.shareMessages(topic, batch, sh.idx)
		}
		s := n.subscriber.subs[l]
		if s == nil || s.topic != topic {
			t.set(i, SubscriberGone)
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
		if member && s.refused.has(origin) || !s.mailbox.do(func() { s.handle(ctx, part, origin, msgs.seq, t, i, queued) }) {
			if member {
				s.refused.note(origin)
			}
			t.set(i, MailboxFull)
			if len(n.hooks.handled) != 0 {
				decided = append(decided, decidedOutcome{s.id, len(part), MailboxFull})
			}
		}
	}
	n.subscriber.mu.RUnlock()
	for _, d := range decided {
		n.handled(topic, d.id, d.messages, d.status, 0, 0)
	}
}

// decidedOutcome is a subscriber's outcome deliver decided without its
// mailbox, kept for the hooks.
type decidedOutcome struct {
	id       SubscriberID
	messages int
	status   DeliveryStatus
}

// handle runs on the subscription's mailbox: the handler sees the batch's
// messages in order and stops at the first error.
func (s *Subscription) handle(ctx context.Context, batch []Message, origin batchOrigin, seq batchSeq, t *batchTracker, i int, queued time.Time) {
	if ctx.Err() != nil {
		s.node.handled(s.topic, s.id, len(batch), Timeout, sinceHookClock(queued), 0)
		return // already reported as Timeout
	}
	if s.isDone() {
		t.set(i, SubscriberGone)
		s.node.handled(s.topic, s.id, len(batch), SubscriberGone, sinceHookClock(queued), 0)
		return
	}
	if seq.seq != 0 {
		// An owner numbers the batches of a topic in the order it accepted
		// them: one that arrives after a later one (it was held up on a
		// stalled route past its publish's timeout) is dropped, not
		// delivered out of order.
		last := s.lastBatch
		if seq.owner == last.owner && seq.inc == last.inc && seq.seq <= last.seq {
			if seq.seq == last.seq {
				t.set(i, s.lastStatus) // a copy of the batch just handled: its outcome
			} else {
				t.set(i, OutOfOrder)
				s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
			}
			return
		}
		s.lastBatch = seq
	}
	if origin.reroute {
		// A copy of a re-routed share this subscription ran (its batch was
		// retried through the same owner and the share re-routed to it
		// again): its outcome, not a second run.
		if last, ok := s.rerouted[origin.producer]; ok && last.seq == origin.seq && last.at == origin.at && last.share == fingerprint(batch) {
			t.set(i, last.status)
			return
		}
	} else if origin.producer != "" {
		// A producer's batches reach the subscriber in its order: an older
		// one arriving late (it was redirected, or retried after its owner
		// died) is dropped and reported; the same one again was delivered.
		last := s.producers[origin.producer]
		switch {
		case origin.seq == last.seq:
			if s.id.Group() == "" || last.share == fingerprint(batch) {
				t.set(i, last.status) // the same batch again: the outcome it had
				return
			}
			// A group member's share of the same batch, but not the share
			// it ran: the batch was retried (its owner crashed mid-batch,
			// or its answer was lost) and assigned anew, so some of these
			// messages were not run here, and its earlier outcome would
			// claim them. On an at-most-once topic running them could
			// repeat what another member ran: dropped and reported, not
			// Delivered. On an at-least-once topic repeats are allowed
			// and losing them is not: run.
			if !origin.atLeastOnce {
				t.set(i, OutOfOrder)
				s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
				return
			}
		case origin.seq < last.seq:
			t.set(i, OutOfOrder)
			s.node.handled(s.topic, s.id, len(batch), OutOfOrder, sinceHookClock(queued), 0)
			return
		}
	}
	ctx = context.WithValue(ctx, subscriberKey{}, s.id)
	started := hookClock(s.node.hooks.handled)
	st, processed := s.run(ctx, batch)
	ran := sinceHookClock(started) // 0, and no clock read, without hooks
	if seq.seq != 0 {
		s.lastStatus = st
	}
	switch {
	case origin.reroute:
		s.rerouted = trackProducer(s.rerouted, origin.producer,
			producerMark{seq: origin.seq, at: origin.at, status: st, share: fingerprint(batch)})
	case origin.producer != "":
		mark := producerMark{seq: origin.seq, status: st}
		if s.id.Group() != "" {
			mark.share = fingerprint(batch)
		}
		s.producers = trackProducer(s.producers, origin.producer, mark)
	}
	if st == SubscriberGone {
		t.setPartial(i, st, processed)
	} else {
		t.set(i, st)
	}
	if !started.IsZero() {
		// After the report, so a slow hook cannot turn the outcome into a
		// Timeout, and with the status the owner got (Timeout when the
		// deadline came first, whatever the handler did after).
		s.node.handled(s.topic, s.id, len(batch), t.status(i), started.Sub(queued), ran)
	}
}

// trackProducer records mark for producer in marks and returns marks.
// Past maxTrackedProducers it forgets another producer's: every node
// incarnation and producer ever seen would otherwise stay. Only that one's
// protection is lost, against a batch already older than its newest.
func trackProducer(marks map[string]producerMark, producer string, mark producerMark) map[string]producerMark {
	return boundedPut(marks, producer, mark, maxTrackedProducers)
}

// producerMark is the last batch of one producer a subscription ran, and
// its outcome.
type producerMark struct {
	seq    uint64
	status DeliveryStatus
	share  shareMark // a group member's: which messages that batch gave it
	at     uint64    // a re-routed share's: its messages' positions (positionsMark)
}

// positionsMark hashes a share's message indices in its batch.
func positionsMark(idx []uint32) uint64 {
	h := uint64(fnvOffset)
	for _, k := range idx {
		h = fnvUint(h, uint64(k))
	}
	return h
}

// shareMark identifies the messages of a group member's share, whatever
// their order: a retried producer batch may be assigned anew, and only the
// same share again may be answered with the outcome it had.
type shareMark struct {
	count int
	sum   uint64
}

// shareSeed seeds share fingerprints, compared only within this process.
var shareSeed = maphash.MakeSeed()

// fingerprint returns batch's shareMark. It runs once per batch a group
// member handles from a producer, so it hashes with maphash (about 10 ns
// for a 128-byte message). A message's header counts as its data and key
// do: messages equal but for their headers are different messages, and a
// share of one is not a copy of a share of the other.
func fingerprint(batch []Message) shareMark {
	m := shareMark{count: len(batch)}
	for j := range batch {
		h := maphash.Bytes(shareSeed, batch[j].Data)
		if batch[j].Key != "" {
			h = mix64(h ^ maphash.String(shareSeed, batch[j].Key))
		}
		if len(batch[j].Header) != 0 {
			h = mix64(h ^ headerHash(batch[j].Header))
		}
		m.sum += mix64(h)
	}
	return m
}

// headerHash hashes a header whatever its maps' iteration order: each
// name with its values, in order, summed over the names.
func headerHash(hd Header) uint64 {
	var sum uint64
	for k, vs := range hd {
		h := maphash.String(shareSeed, k)
		for _, v := range vs {
			h = mix64(h ^ maphash.String(shareSeed, v))
		}
		sum += mix64(h ^ uint64(len(vs)))
	}
	return sum + 1 // a header with no names still differs from none
}

// run hands a batch's messages to the handler in order, stopping at the
// first error. A message its codec rejects (a Topic's handler) is skipped
// and reported as DecodeError once the rest of the batch ran. With a
// Propagator, each message gets the ctx it extracts from its header.
//
// A subscription that ends partway through (Unsubscribe, Close) stops
// there: the batch is SubscriberGone, not Delivered, and processed says
// how many messages ran, so the owner re-routes only the rest of a group
// member's share.
func (s *Subscription) run(ctx context.Context, batch []Message) (status DeliveryStatus, processed int) {
	status = Delivered
	prop := s.node.cfg.Propagator
	for j := range batch {
		mctx := ctx
		if prop != nil {
			mctx = prop.Extract(ctx, batch[j].Header)
		}
		if err := s.call(mctx, &batch[j]); err != nil {
			if !errors.As(err, new(*decodeError)) {
				if ok, held := s.node.log.limit.allow("handler/" + s.id.Local); ok {
					s.node.log.Warn("handler failed", "topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held)
				}
				return HandlerError, j
			}
			status = DecodeError
			if ok, held := s.node.log.limit.allow("decode/" + s.id.Local); ok {
				s.node.log.Warn("message rejected by the codec", "topic", s.topic, "subscriber", s.id.String(), "err", err, "suppressed", held)
			}
		}
		if s.isDone() && j < len(batch)-1 {
			return SubscriberGone, j + 1 // ended mid-batch: no further message reaches it
		}
	}
	return status, len(batch)
}

// maxTrackedProducers bounds the producers (BatchingProducers and the
// implicit one of each publishing node incarnation) a subscription keeps
// the last batch number of.
const maxTrackedProducers = 4096

// call runs the handler, turning a panic into an error so one bad message
// cannot take the node down.
func (s *Subscription) call(ctx context.Context, m *Message) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pubsub: handler panicked: %v", r)
		}
	}()
	return s.handler(ctx, m)
}

// onEvict ends a local subscription its owner evicted.
func (n *Node) onEvict(e *wire.Evict, reply string) {
	n.evictLocal(e.GetTopic(), e.GetSubscriber(), DeliveryStatus(e.GetStatus()))
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK})
}

func (n *Node) evictLocal(topic, local string, status DeliveryStatus) {
	s := n.subscriber.remove(local, topic)
	if s == nil {
		return
	}
	n.log.Info("subscriber evicted", "topic", topic, "subscriber", s.id.String(), "status", status.String())
	// Name the topic and the failure, and say what a subscriber can do:
	// the owner will not take it back on its own.
	s.end(fmt.Errorf("%w: %s from topic %q (last failure: %s); Subscribe again to receive the topic's messages", ErrEvicted, s.id, topic, status))
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
// milliseconds, at least 1 (0 says nothing), at most what the field holds.
func timeoutMillis(d time.Duration) uint32 {
	return uint32(min(max(d.Milliseconds(), 1), math.MaxUint32))
}
