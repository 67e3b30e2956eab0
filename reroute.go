package pubsub

import (
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Re-routing, owner side: a group member that definitely did not process
// its share of a batch (SubscriberGone, MailboxFull; on an AtLeastOnce
// topic also Timeout) has it sent to the next-ranked live member, within
// SubscriberTimeout of the batch's acceptance. The group then counts as
// delivered if the share was processed there.

// reroutes is what a batch with groups keeps to re-route a failed share.
// Everything in it is read-only once the batch is sent: reports arrive on
// any goroutine.
type reroutes struct {
	msgs        payload
	v           *view
	seq         uint64
	groups      map[string]*groupRoute
	shareOf     map[SubscriberID][]uint32
	keys        []string // per message, nil without keys
	until       time.Time
	atLeastOnce bool
	// tried and shareOf's growth are guarded by the batch's mu: tried
	// lists the members that failed the batch, so a share never goes back
	// to one of them.
	tried map[SubscriberID]bool
	pack  sync.Once // packs msgs for remote re-routes, once
}

// reroutable reports whether status leaves the share surely unprocessed
// (or, at least once, possibly so).
func (r *reroutes) reroutable(s DeliveryStatus) bool {
	return s == SubscriberGone || s == MailboxFull || (r.atLeastOnce && s == Timeout)
}

// plan re-assigns failed's share among the group's members that have not
// failed this batch; ok is false when none is left or time is up. Callers
// hold the batch's mu.
func (r *reroutes) plan(failed SubscriberID) (map[string][]share, bool) {
	g := r.groups[failed.Group()]
	idx := r.shareOf[failed]
	if g == nil || len(idx) == 0 || time.Now().After(r.until) {
		return nil, false
	}
	if r.tried == nil {
		r.tried = map[SubscriberID]bool{}
	}
	r.tried[failed] = true
	excluded := func(i int) bool {
		_, live := r.v.member(g.members[i].Node)
		return r.tried[g.members[i]] || !live
	}
	byMember := map[int][]uint32{}
	for _, k := range idx {
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
	for m, k := range byMember {
		id := g.members[m]
		out[id.Node] = append(out[id.Node], share{local: id.Local, idx: k})
		r.shareOf[id] = slices.Concat(r.shareOf[id], k) // if it fails too, all of it moves on
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

// sendReroutes delivers re-routed shares, each node's in one delivery
// marked reroute, and reports them to b like any other.
func (a *topicActor) sendReroutes(b *pendingBatch, byNode map[string][]share) {
	n, r := a.n, b.reroute
	for node, shares := range byNode {
		t := nodeTarget{node: node, shares: shares}
		if node == n.self.ID {
			n.deliver(a.topic, nil, shares, r.msgs, func(st []DeliveryStatus) { b.report(node, t.all(), st, false) })
			continue
		}
		m, ok := r.v.member(node)
		if !ok {
			all := t.all()
			b.report(node, all, fill(len(all), SubscriberGone), false)
			continue
		}
		head, _ := proto.Marshal(&wire.DeliverBatch{Owner: n.selfRef(), Topic: a.topic, Seq: r.seq, Count: uint32(r.msgs.len()),
			Publisher: r.msgs.publisher, Reroute: true})
		r.pack.Do(func() { r.msgs.wire() })
		packed, withMeta := r.msgs.packed, r.msgs.withMeta
		suffix, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Shares: sharesToWire(shares)}}})
		n.deliverRemote(b, m, remoteBatch{head, packed, suffix, withMeta}, t.all(), false, r.until)
	}
}
