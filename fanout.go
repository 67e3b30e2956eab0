package pubsub

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// The owner's network fan-out: one DeliverBatch per subscriber node, sent
// from pooled buffers, and the collection of the nodes' reports into one
// ack.

// splitSubscribers cuts a node's subscriber list into runs whose encoding
// fits in room bytes (at least one subscriber per run).
func splitSubscribers(locals []string, room int) [][]string {
	var parts [][]string
	start, size := 0, 16 // envelope and field headers
	for i, l := range locals {
		sz := len(l) + 3
		if i > start && size+sz > room {
			parts = append(parts, locals[start:i])
			start, size = i, 16
		}
		size += sz
	}
	return append(parts, locals[start:])
}

// deliverRemote sends one node its batch and reports the outcome to b. When
// NATS answers "no responders" (the node's inbox interest has not reached our
// server yet, or the node is reconnecting) nothing was delivered, so it
// retries while the node is in the view, until the subscriber timeout. In
// at-least-once mode it also re-sends when a copy got no report in a quarter
// of the subscriber timeout; the node delivers the batch once and answers
// every copy.
//
// wait, when not zero, bounds the wait for the node's report (a re-route
// must be answered within the publisher's wait).
//
// In at-least-once mode a node that never reports is given up on a quarter
// of a RequestTimeout after its subscribers' own timeout (resendUntil):
// that leaves a consumer group's re-route of the share (reroutes.until,
// half a RequestTimeout after it) time to be planned, and answered before
// the publisher stops waiting. Giving up at the re-route deadline itself
// meant a member on an unreachable node was never re-routed.
func (n *Node) deliverRemote(b *pendingBatch, m Member, data remoteBatch, to nodeTarget, atLeastOnce bool, until time.Time, wait time.Duration) {
	timeout := n.cfg.SubscriberTimeout + n.cfg.RequestTimeout/2
	resendUntil := until.Add(n.cfg.RequestTimeout / 4)
	if atLeastOnce {
		timeout = max(min(n.cfg.SubscriberTimeout/4, time.Until(resendUntil)), 20*time.Millisecond)
	}
	if wait > 0 {
		timeout = min(timeout, wait)
	}
	alive := n.holds(m)
	buf := data.encode()
	tok := n.rpc.send(m.Inbox, *buf, timeout, func(rep *wire.Reply, err error) {
		if data.kept != nil && err == nil && rep.GetCode() == wire.Reply_NOT_KEPT {
			// The publisher no longer holds its copy: the messages go
			// now, as to any other node. Nothing ran there.
			data.kept = nil
			// The owner's later batches, sent meanwhile, may arrive
			// first: an OutOfOrder from this send is no forged mark.
			data.first = false
			n.deliverRemote(b, m, data, to, atLeastOnce, until, wait)
			return
		}
		// refused: this node's connection, reconnecting, would not take the
		// write (its reconnect buffer is full, or disabled). Nothing was
		// sent, as with no responders; the error comes from within send,
		// so it is retried after a pause, never at once.
		refused := errors.Is(err, nats.ErrReconnectBufExceeded)
		unsent := refused || natsutil.IsNoResponders(err)
		retry := unsent || (atLeastOnce && errors.Is(err, ErrTimeout))
		if retry && n.life.ctx.Err() == nil && alive() {
			data.first = false // a retry may arrive after a later batch
			again := func() { n.deliverRemote(b, m, data, to, atLeastOnce, until, wait) }
			now := time.Now()
			switch {
			case unsent && now.Before(until), refused && atLeastOnce && now.Before(resendUntil):
				time.AfterFunc(10*time.Millisecond, again)
				return
			case atLeastOnce && now.Before(resendUntil):
				// A copy may be in the node's mailboxes: keep asking until
				// the node's own subscriber timeout must have passed.
				again()
				return
			}
		}
		st, processed, path := remoteStatuses(n, m.ID, to.len(), rep, err)
		var behind []uint32
		if data.first && !path && len(rep.GetBehind()) > 0 && n.nc.Stats().Reconnects == b.reconnects {
			// Only on one connection do the sends keep their order: after a
			// reconnect (to another server) a later batch can overtake
			// this one, held up on the old server's route.
			behind = rep.GetBehind()
		}
		b.report(to, st, processed, path, behind)
	})
	sendBufs.Put(buf) // the connection copied it
	// A node that leaves the view (crash) will not report: its subscribers
	// are gone, and the ack need not wait for the timeout.
	n.rpc.watch(tok, alive)
}

// remoteBatch is one node's DeliverBatch: the batch fields and messages
// shared by every node, then that node's subscriber list. It is assembled
// into a pooled buffer for each send, so the messages are copied once per
// node, straight into the buffer NATS copies from.
type remoteBatch struct {
	head, packed, suffix []byte
	// msgs, when unpacked: the messages, packed into each send's buffer
	// (a group's subset for one node) instead of packed.
	msgs     msgBatch
	unpacked bool
	withMeta bool // the messages go in format 2
	// first: this send is the batch's first to its node, not a retry (its
	// report's behind then names forged marks, see pendingBatch.report).
	first bool
	// kept, when not nil: the node is the batch's publisher and kept the
	// messages under these numbers; they are left out (kept.go).
	kept []uint64
}

// sendBufs recycles the buffers remote batches are assembled in; NATS copies
// a message into its own write buffer before Publish returns.
var sendBufs = sync.Pool{New: func() any { return new([]byte) }}

func (r remoteBatch) encode() *[]byte {
	buf := sendBufs.Get().(*[]byte)
	if r.kept != nil {
		*buf = append(wire.AppendDeliverKept((*buf)[:0], r.head, r.kept), r.suffix...)
		return buf
	}
	if r.unpacked {
		*buf = append(wire.AppendDeliverMsgs((*buf)[:0], r.head, r.msgs.data, r.msgs.meta), r.suffix...)
		return buf
	}
	*buf = append(wire.AppendDeliver((*buf)[:0], r.head, r.packed, r.withMeta), r.suffix...)
	return buf
}

// remoteStatuses turns a node's delivery report (or its absence) into one
// status per subscriber, and the messages each ran when the node said so
// (nil otherwise; see wire.Reply.processed). path is true when the node
// did not report: the network or the node failed, not its subscribers, so
// the failures are reported as Timeout (outcome unknown), or SubscriberGone
// when the node left the view, but never count towards eviction.
func remoteStatuses(n *Node, node string, count int, rep *wire.Reply, err error) (st []DeliveryStatus, processed []uint32, path bool) {
	if err == nil && rep.GetCode() == wire.Reply_OK && len(rep.GetStatuses()) == count {
		st := make([]DeliveryStatus, count)
		for i, s := range rep.GetStatuses() {
			st[i] = DeliveryStatus(s)
			if s > uint32(lastDeliveryStatus) {
				st[i] = HandlerError // a newer node's status this one cannot name
			}
		}
		if p := rep.GetProcessed(); len(p) == count {
			processed = p
		}
		return st, processed, false
	}
	if rep.GetCode() == wire.Reply_CLOSED {
		return fill(count, SubscriberGone), nil, false
	}
	if _, ok := n.view().member(node); !ok {
		// Gone with its node, but not evicted for it: reconcile drops the
		// node's subscribers for the view it left. The batch's last report
		// can come views later, after a node wrongly suspected is back and
		// re-registered them: evicted then, they would stop receiving
		// without a notice.
		return fill(count, SubscriberGone), nil, true
	}
	if ok, held := n.log.limit.allow("deliver/" + node); ok {
		n.log.Warn("delivery to node failed", "node", node, "err", err, "code", rep.GetCode(), "suppressed", held)
	}
	return fill(count, Timeout), nil, true
}

func fill(n int, s DeliveryStatus) []DeliveryStatus {
	st := make([]DeliveryStatus, n)
	for i := range st {
		st[i] = s
	}
	return st
}

// pendingBatch collects the per-node reports of one accepted batch.
type pendingBatch struct {
	a         *topicActor
	answer    func(ownerAnswer)
	mu        sync.Mutex
	remaining int
	ack       PublishAck
	outcomes  []subscriberOutcome
	wantIDs   bool // list the delivered subscribers in the answer
	delivered []SubscriberID
	// groups: whether every member of each group with a share so far
	// processed it; a group counts once in Delivered.
	groups map[string]bool
	// failedMembers lists the group members in ack.Failures: one that
	// fails its own share and a re-routed one is listed once.
	failedMembers map[SubscriberID]bool
	reroute       *reroutes    // nil without groups
	early         *earlyAnswer // nil unless the publisher stops waiting first (answer_by.go)
	// reconnects: the connection's reconnect count when the batch was
	// numbered; a first send's behind is believed only while it holds.
	reconnects uint64
	bytes      int64 // the messages' size, counted in the owner's in-flight budget
}

type subscriberOutcome struct {
	id     SubscriberID
	status DeliveryStatus
	path   bool // no report from the node: not the subscriber's failure
	// markAhead: OutOfOrder for a batch nothing could have overtaken (its
	// first send, or a local delivery): the subscription's order mark came
	// from a delivery forged in this owner's name, and it would drop every
	// batch of this incarnation. Evicted, so that it is told.
	markAhead bool
}

// addParts counts extra reports to wait for (a node's list sent in parts).
func (b *pendingBatch) addParts(k int) {
	if k > 0 {
		b.mu.Lock()
		b.remaining += k
		b.mu.Unlock()
	}
}

// report records one node's statuses for its part of the batch. processed,
// when not nil, says how many messages each subscriber ran before its
// subscription ended mid-batch: only the rest of a member's share is
// re-routed, so the group sees no message twice.
//
// behind lists the subscribers (indices into st) that dropped the batch as
// OutOfOrder by its owner's number, from a send nothing can have
// overtaken (the batch's first to a node, or a local delivery), else nil.
func (b *pendingBatch) report(to nodeTarget, st []DeliveryStatus, processed []uint32, path bool, behind []uint32) {
	b.mu.Lock()
	var moved []map[string][]share
	for i, s := range st {
		markAhead := s == OutOfOrder && slices.Contains(behind, uint32(i))
		id := SubscriberID{Node: to.node, Local: to.local(i)}
		if b.early != nil {
			b.early.waiting.reported(id)
		}
		// Only a node's own report carries processed, for all its
		// subscribers once one of them ended partway: this one's share is
		// partial only if it ran some of it (a subscription that ends
		// mid-batch ran at least one message).
		partial := processed != nil && processed[i] > 0
		if g := id.Group(); g != "" && s != Delivered && b.reroute != nil && b.reroute.reroutable(g, s, partial, path) {
			idx := to.idx(i)
			if processed != nil && int(processed[i]) <= len(idx) {
				idx = idx[processed[i]:]
			}
			if plan, ok := b.reroute.plan(id, idx, s); ok {
				// Its share goes to the next member; the outcome there
				// decides the group's.
				b.remaining += len(plan)
				moved = append(moved, plan)
				if b.early != nil {
					for node, shares := range plan {
						b.early.waiting.add(nodeTarget{node: node, shares: shares})
					}
				}
				b.outcomes = append(b.outcomes, subscriberOutcome{id, s, path, markAhead})
				continue
			}
		}
		if g := id.Group(); g != "" {
			if b.groups == nil {
				b.groups = map[string]bool{}
			}
			ok, seen := b.groups[g]
			b.groups[g] = (ok || !seen) && s == Delivered
			if s != Delivered && !b.failedMembers[id] {
				if b.failedMembers == nil {
					b.failedMembers = map[SubscriberID]bool{}
				}
				b.failedMembers[id] = true
				b.ack.Failures = append(b.ack.Failures, DeliveryFailure{Subscriber: id, Status: s, Group: g})
			}
		} else if s == Delivered {
			b.ack.Delivered++
			if b.wantIDs {
				b.delivered = append(b.delivered, id)
			}
		} else {
			b.ack.Failures = append(b.ack.Failures, DeliveryFailure{Subscriber: id, Status: s})
		}
		b.outcomes = append(b.outcomes, subscriberOutcome{id, s, path, markAhead})
	}
	b.remaining--
	done := b.remaining == 0
	answered := false // at the publisher's deadline
	if done && b.early != nil {
		answered = b.early.sent
		b.early.sent = true
		b.early.timer.Stop()
	}
	if done {
		for g, ok := range b.groups {
			if ok {
				b.ack.Delivered++
				if b.wantIDs { // chunkAcks merges a group by this stand-in ID
					b.delivered = append(b.delivered, SubscriberID{Local: groupMark + g})
				}
			}
		}
	}
	b.mu.Unlock()
	for _, plan := range moved {
		b.reroute.send(b, plan)
	}
	if !done {
		return
	}
	a := b.a
	a.n.stats.delivered.Add(uint64(b.ack.Delivered))
	a.n.stats.failed.Add(uint64(len(b.ack.Failures)))
	// Evictions are queued before the answer, so the publisher's next batch
	// is served without the subscribers this one evicted.
	a.s.do(func() {
		a.inflight--
		a.n.owner.release(int(b.bytes))
		a.account(b.outcomes)
	})
	a.n.emitAccepted(b.ack)
	if !answered {
		b.answer(ownerAnswer{code: wire.Reply_OK, viewID: a.n.view().id, ack: b.ack, delivered: b.delivered})
	}
}

// sendRemote sends a remote node its part of a batch. Protobuf merges
// repeated occurrences of an embedded message, so the node's subscriber
// list is appended to the encoding all nodes share (head, built once, and
// the packed messages) instead of re-encoding the messages for every node.
// A list too long to fit beside the batch goes in several messages, each
// reported apart; the group members' shares go with the first. A node
// with only group members gets only their messages.
func (a *topicActor) sendRemote(b *pendingBatch, m Member, t nodeTarget, msgs *payload, head *[]byte, atLeastOnce bool) {
	n := a.n
	shares := t.shares
	data := remoteBatch{first: true}
	size := 0 // of the packed messages
	// The publisher's node holds the whole batch when it kept a copy: its
	// group members' shares then name messages of it, not of a subset.
	data.kept = msgs.keptFor(m, len(t.locals) > 0)
	if len(t.locals) == 0 && data.kept == nil {
		// received: the messages alias a request's buffer, not a
		// publisher's slices (which wire packs for a node sent the whole
		// batch before this one).
		received := msgs.packed != nil && !msgs.packedHere
		if sub, sh, ok := msgs.subset(shares); ok {
			msgs, shares = &sub, sh
			var own []byte // the shared head counts the whole batch
			head = &own
			if received {
				// Packed straight into each send's buffer: the subset is
				// this node's alone. A publisher's own slices are packed
				// once, below, as the whole batch is: a re-send must not
				// read what it may have reused since.
				data = remoteBatch{msgs: sub.msgs, unpacked: true, withMeta: sub.msgs.meta != nil, first: true}
				if data.withMeta {
					size = wire.PackedMetaSize(sub.msgs.data, sub.msgs.meta)
				} else {
					size = wire.PackedSize(sub.msgs.data)
				}
			}
		}
	}
	if *head == nil {
		*head, _ = proto.Marshal(&wire.DeliverBatch{Owner: n.selfRef(), Topic: a.topic, Seq: msgs.seq.seq,
			Count: uint32(msgs.len()), AtLeastOnce: atLeastOnce, Producer: msgs.origin.producer, ProducerSeq: msgs.origin.seq,
			SplitId: msgs.origin.split.id, SplitChunk: msgs.origin.split.index,
			Publisher: msgs.publisher, SubscriberTimeoutMs: timeoutMillis(n.cfg.SubscriberTimeout)})
	}
	data.head = *head
	if !data.unpacked {
		data.packed, data.withMeta = msgs.wire()
		size = len(data.packed)
	}
	parts := splitSubscribers(t.locals, n.maxPayload()-len(*head)-size-16-sharesSize(shares))
	if len(parts) > 1 {
		// A non-at-least-once part takes the copy: the next part would
		// find none, be sent again with the messages, and arrive after
		// the owner's later batches.
		data.kept = nil
	}
	b.addParts(len(parts) - 1)
	for i, part := range parts {
		body := &wire.DeliverBatch{Subscribers: part, ToIncarnation: m.Incarnation}
		to := nodeTarget{node: t.node, locals: part}
		if i == 0 && len(shares) > 0 {
			body.Shares = sharesToWire(shares)
			to.shares = t.shares // reported by their indices into the whole batch, as re-routes need
		}
		data.suffix, _ = proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: body}})
		n.deliverRemote(b, m, data, to, atLeastOnce, time.Now().Add(n.cfg.SubscriberTimeout), 0)
	}
}

// nodeTarget is one node's part of a batch: its subscribers that get every
// message, and its group members' shares.
type nodeTarget struct {
	node   string
	locals []string
	shares []share
}

// len is the number of statuses a delivery to the target reports: its
// subscribers', then its shares'.
func (t nodeTarget) len() int { return len(t.locals) + len(t.shares) }

// local names the subscriber of status i.
func (t nodeTarget) local(i int) string {
	if i < len(t.locals) {
		return t.locals[i]
	}
	return t.shares[i-len(t.locals)].local
}

// idx returns the message indices status i covers; nil for a subscriber
// that got the whole batch.
func (t nodeTarget) idx(i int) []uint32 {
	if i < len(t.locals) {
		return nil
	}
	return t.shares[i-len(t.locals)].idx
}

// sharesSize bounds the encoded size of shares.
func sharesSize(shares []share) int {
	n := 0
	for _, s := range shares {
		n += len(s.local) + 8 + 5*len(s.idx)
	}
	return n
}
