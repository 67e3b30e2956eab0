package pubsub

import (
	"maps"
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Re-routing, owner side: a group member that definitely did not process
// its share of a batch (SubscriberGone, MailboxFull; on an AtLeastOnce
// topic also Timeout) has it sent to the next-ranked live member that has
// not failed the batch. The group then counts as delivered if the share was
// processed there. Re-routes start within SubscriberTimeout of the batch's
// acceptance (a Timeout, which comes only after it, or on an AtLeastOnce
// topic a SubscriberGone, which a crashed member's node leaving the view
// gives until then, within half a RequestTimeout more), and each is
// answered before the publisher's wait ends.

// reroutes is what a batch with groups keeps to re-route a failed share.
// Its fields are read-only once the batch is sent (reports arrive on any
// goroutine), but tried, which the batch's mu guards.
type reroutes struct {
	n           *Node
	topic       string
	msgs        payload // never modified: copied before use
	seq         uint64
	groups      map[string]*groupRoute
	keys        []string  // per message, nil without keys
	accepted    time.Time // when the owner accepted the batch
	atLeastOnce bool
	// replayed names the groups that saw this producer batch before: a
	// retry through the same owner, assigned as the first attempt was.
	replayed map[string]bool
	// tried lists the members that failed the batch, so a share never
	// goes back to one of them.
	tried map[SubscriberID]bool

	pack     sync.Once // packs the batch for remote re-routes, once
	packed   []byte
	withMeta bool
}

// reroutable reports whether status leaves a share surely unprocessed
// (or, at least once, possibly so). SubscriberGone is sure when the node
// said so itself or was never sent the share (not path), or when the
// node's own report said how far the subscriber got (partial: a
// subscription that ended mid-batch, reported just before its node left
// gracefully, as a CLI's sub does). One found because the node left the
// view (path), as by crashing, is not: the node may have run the share
// first, and an at-most-once topic must not run it twice. That is decided
// by how the status was found, not by the view now: a node wrongly
// suspected may be back in it by the time the status is read.
//
// A retry of a batch the group saw before (replayed) is different on an
// at-most-once topic: the member may have run its share in an earlier
// attempt whose answer was lost, and its subscription ended (or its mailbox
// filled) since. Its node then answers SubscriberGone or MailboxFull
// without having run this copy, which says nothing of the first: such a
// share is reported, not re-routed. Only a partial report, from a
// subscription that ran part of this very copy, still tells what is left.
func (r *reroutes) reroutable(group string, s DeliveryStatus, partial, path bool) bool {
	if r.replayed[group] && !r.atLeastOnce && !partial {
		return false
	}
	switch s {
	case MailboxFull:
		return true
	case SubscriberGone:
		return !path || partial || r.atLeastOnce
	case Timeout:
		return r.atLeastOnce
	}
	return false
}

// until is the last moment a re-route may start. On an at-least-once
// topic a SubscriberGone has the Timeout's window: a member's node that
// crashed is reported SubscriberGone when it leaves the view, which can come
// at any time until the resends run out (deliverRemote's resendUntil, past
// SubscriberTimeout); the Timeout it would otherwise have become re-routes.
func (r *reroutes) until(s DeliveryStatus) time.Time {
	until := r.accepted.Add(r.n.cfg.SubscriberTimeout)
	if s == Timeout || (s == SubscriberGone && r.atLeastOnce) {
		until = until.Add(r.n.cfg.RequestTimeout / 2)
	}
	return until
}

// answerBy is when every re-route must have reported: before the
// publisher, who waits SubscriberTimeout + RequestTimeout from its send,
// gives up.
func (r *reroutes) answerBy() time.Time {
	return r.accepted.Add(r.n.cfg.SubscriberTimeout + r.n.cfg.RequestTimeout*3/4)
}

// plan re-assigns idx, the messages failed did not process, among the
// group's live members that have not failed this batch, by node; ok is
// false when none is left or it is too late. Callers hold the batch's mu.
func (r *reroutes) plan(failed SubscriberID, idx []uint32, status DeliveryStatus) (map[string][]share, bool) {
	g := r.groups[failed.Group()]
	if g == nil || len(idx) == 0 || time.Now().After(r.until(status)) {
		return nil, false
	}
	if r.tried == nil {
		r.tried = map[SubscriberID]bool{}
	}
	r.tried[failed] = true
	v := r.n.view() // members that died since the batch was accepted are skipped
	excluded := func(i int) bool {
		_, live := v.member(g.members[i].Node)
		return r.tried[g.members[i]] || !live
	}
	byMember := map[int][]uint32{}
	for _, k := range idx { // increasing, so each member's share is too
		var m int
		if r.keys != nil && r.keys[k] != "" {
			m = g.rank(slotOf(r.keys[k]), excluded)
		} else {
			m = g.nextAfter(failed, excluded)
		}
		if m < 0 {
			return nil, false
		}
		byMember[m] = append(byMember[m], k)
	}
	out := map[string][]share{}
	for _, m := range slices.Sorted(maps.Keys(byMember)) {
		id := g.members[m]
		out[id.Node] = append(out[id.Node], share{local: id.Local, idx: byMember[m]})
	}
	return out, true
}

// nextAfter returns the first member after id, in order, not excluded.
func (g *groupRoute) nextAfter(id SubscriberID, excluded func(int) bool) int {
	start := 0
	for i, m := range g.members {
		if m == id {
			start = i
		}
	}
	for d := 1; d <= len(g.members); d++ {
		if i := (start + d) % len(g.members); !excluded(i) {
			return i
		}
	}
	return -1
}

// send delivers re-routed shares, each node's in one delivery
// marked reroute, and reports them to b like any other.
func (r *reroutes) send(b *pendingBatch, byNode map[string][]share) {
	n := r.n
	for node, shares := range byNode {
		t := nodeTarget{node: node, shares: shares}
		if node == n.self.ID {
			// A re-route is taken whatever batches its member had: no
			// batch number to check; the producer's only answers a copy.
			msgs := r.msgs
			msgs.seq, msgs.origin = batchSeq{}, batchOrigin{}
			if p := r.msgs.origin.producer; p != "" { // as onDeliver: a batch from an older publisher has none
				msgs.origin = batchOrigin{producer: p, seq: r.msgs.origin.seq, reroute: true}
			}
			// Within the publisher's wait, as a remote re-route is: given a
			// whole SubscriberTimeout from now, its member's outcome came
			// after the publisher gave up (ErrTimeout, and a producer's
			// retry ran the batch twice). A member that did not finish in
			// the shortened time did not fail its own timeout: not evicted
			// for it.
			wait := min(n.cfg.SubscriberTimeout, time.Until(r.answerBy()))
			if wait <= 0 {
				b.report(t, fill(t.len(), SubscriberGone), nil, true, nil)
				continue
			}
			if wait == n.cfg.SubscriberTimeout {
				n.deliverWithin(wait, r.topic, nil, shares, msgs, func(st []DeliveryStatus, processed, _ []uint32) {
					b.report(t, st, processed, false, nil)
				})
				continue
			}
			// Cut short: each share is reported on its own, so only a
			// member that ran out of the shortened time is spared.
			b.addParts(len(shares) - 1)
			for _, sh := range shares {
				one := nodeTarget{node: node, shares: []share{sh}}
				n.deliverWithin(wait, r.topic, nil, one.shares, msgs, func(st []DeliveryStatus, processed, _ []uint32) {
					b.report(one, st, processed, st[0] == Timeout, nil)
				})
			}
			continue
		}
		m, ok := n.view().member(node)
		wait := time.Until(r.answerBy())
		if !ok || wait <= 0 {
			// Not the member's failure: a live one is not evicted for it
			// (nor one that left, see remoteStatuses).
			b.report(t, fill(t.len(), SubscriberGone), nil, true, nil)
			continue
		}
		r.pack.Do(func() {
			msgs := r.msgs
			r.packed, r.withMeta = msgs.wire()
		})
		head, _ := proto.Marshal(&wire.DeliverBatch{Owner: n.selfRef(), Topic: r.topic, Seq: r.seq, Count: uint32(r.msgs.len()),
			Publisher: r.msgs.publisher, Reroute: true, Producer: r.msgs.origin.producer, ProducerSeq: r.msgs.origin.seq,
			SubscriberTimeoutMs: timeoutMillis(n.cfg.SubscriberTimeout)})
		suffix, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Shares: sharesToWire(shares), ToIncarnation: m.Incarnation}}})
		n.deliverRemote(b, m, remoteBatch{head: head, packed: r.packed, suffix: suffix, withMeta: r.withMeta}, t, false, r.answerBy(), wait)
	}
}
