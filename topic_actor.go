package pubsub

import (
	"slices"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// topicActor is the owner side of one topic: the subscriber set grouped by
// node, batch fan-out, and eviction. Its fields below s are touched only by
// work running on s.
type topicActor struct {
	n     *Node
	topic string
	s     serial

	reconciled  // epoch, synced, owned, ready, waitSince
	collection  // inflight, used, dead
	statsMirror // count, groupSizes

	seq   uint64 // the last batch's number; starts at the creation time
	nodes map[string]*nodeSubscribers
	fails map[SubscriberID]failStreak // consecutive failures, for eviction
	// producers holds the last batch number accepted of each producer
	// (bounded by maxTrackedProducers and the node's budget,
	// producer_marks.go), to keep a pipelined producer's order through a
	// move.
	producers producerMarks[uint64]
	groups    groupBook
	early     earlyQueue // shared with the inbox: see early.go
	// queuedBytes counts the packed bytes of AckDelivered publishes from
	// other nodes waiting in the actor's queue (shared with the inbox).
	queuedBytes atomic.Int64
}

// reconciled is where reconcile left the actor in the node's views.
type reconciled struct {
	epoch  uint64 // view epoch the state was reconciled to; noEpoch when fresh
	synced uint64 // view epoch whose syncs were merged; noEpoch when none
	// syncedResync is the registry's resync count (syncRegistry.resyncs)
	// when the syncs were merged: a resync's answers are merged too.
	syncedResync uint64
	owned        bool // this node owns the topic in view epoch
	ready        bool // the subscriber set is complete for epoch
	// waitSince: a topic kept through a view in which a member came back
	// is not ready until that view's syncs are merged, or MemberTimeout
	// after this (zero when not waiting; see reconcile).
	waitSince time.Time
}

// collection is what tells when the actor is collected (owner.go:
// collectIdleActors).
type collection struct {
	// inflight counts accepted batches not yet accounted; used marks the
	// last request. An idle actor without subscribers is collected.
	inflight int
	used     time.Time
	dead     bool // collected: work that still reaches it goes to its successor
}

// statsMirror holds the subscriber counts read without the actor: by Stats,
// and count by collectIdleActors too.
type statsMirror struct {
	count atomic.Int64 // subscribers, readable by Stats without the actor
	// groupSizes is a copy of groups.sizes for Stats, replaced on change.
	groupSizes atomic.Pointer[map[string]int]
}

// nodeSubscribers is one node's subscribers of one topic.
type nodeSubscribers struct {
	inc  uint64 // the node's incarnation
	set  map[string]struct{}
	list []string // sorted cache of set; nil when stale
}

func (ns *nodeSubscribers) locals() []string {
	if ns.list == nil {
		ns.list = make([]string, 0, len(ns.set))
		for l := range ns.set {
			ns.list = append(ns.list, l)
		}
		slices.Sort(ns.list)
	}
	return ns.list
}

// reconcile brings the actor's state to the node's current view: it keeps
// serving a topic it owned throughout, drops subscribers of departed nodes,
// and rebuilds a topic it gained from the members' syncs.
func (a *topicActor) reconcile() *view {
	n := a.n
	v := n.view()
	if a.epoch != v.epoch {
		owned := v.ownerOf(a.topic).ID == n.self.ID
		if n.events.enabled() {
			// Report a move this node takes part in: it owned the topic in
			// the previous view and not now, or the other way round.
			if prev := n.viewAt(v.epoch - 1); prev != nil {
				was := prev.ownerOf(a.topic).ID
				if (was == n.self.ID) != owned {
					emit(n.events, TopicOwnerChanged{Topic: a.topic, OldOwner: was, NewOwner: v.ownerOf(a.topic).ID})
				}
			}
		}
		// A topic waiting for a returned member's sync (waitSince) is
		// complete but for that member's share: it is kept too.
		keep := owned && a.owned && (a.ready || !a.waitSince.IsZero()) && n.ownedThroughout(a.topic, a.epoch, v.epoch)
		if keep {
			for id, ns := range a.nodes {
				if m, ok := v.member(id); !ok || m.Incarnation != ns.inc {
					a.dropNode(id)
				}
			}
			if a.epoch != noEpoch && v.returned > 0 && v.returned >= a.epoch {
				// A member came back (a partition healed, a false suspicion
				// ended): what it subscribed to meanwhile went to another
				// owner, and reaches this one by sync (its answer, or its
				// push). Serving before it arrives would leave those
				// subscribers out of the acks without a word. A member that
				// cannot answer holds the topic up for MemberTimeout at most.
				a.ready = false
				if a.waitSince.IsZero() { // flapping members do not extend the bound
					a.waitSince = time.Now()
				}
			}
		} else {
			if a.owned && !owned {
				n.log.Debug("topic moved away", "topic", a.topic, "owner", v.ownerOf(a.topic).ID)
			}
			if owned && a.epoch != noEpoch && a.epoch+1 < v.epoch {
				// Asleep for several views: this view's registry may hold
				// only the share of the members that changed in it.
				n.owner.registry.resync(v)
			}
			a.nodes, a.fails, a.ready, a.groups = nil, nil, false, groupBook{}
			a.waitSince = time.Time{}
			a.publishGroupSizes()
			a.countRecords(-a.count.Load())
		}
		a.owned, a.epoch = owned, v.epoch
	}
	// Every member's sync for this view is merged once it is complete, also
	// into a topic kept from the previous view: a member that was dropped
	// (a false suspicion) and is back re-registers its subscribers this way.
	// A resync (an actor asleep past the view history asked every member
	// again) is merged into the actors that took this view's syncs before
	// it too: its answers are pending for their topics until taken.
	resyncs := n.owner.registry.resyncs.Load()
	if a.owned && (a.synced != v.epoch || a.syncedResync != resyncs) {
		if subs, ok := n.owner.registry.take(a.topic, v.epoch); ok {
			for node, locals := range subs {
				m, _ := v.member(node)
				dropped := 0
				for _, l := range locals {
					if !a.fits(SubscriberID{Node: node, Local: l}, m.Incarnation) {
						// Not told: only a cluster past the bound, or
						// forged subscribe requests, get here.
						dropped++
						continue
					}
					a.add(node, m.Incarnation, l)
				}
				if dropped > 0 {
					a.n.refuseRecords(a.topic, node, dropped)
				}
			}
			a.ready, a.synced, a.syncedResync, a.waitSince = true, v.epoch, resyncs, time.Time{}
		}
	}
	if !a.waitSince.IsZero() && time.Since(a.waitSince) > n.cfg.MemberTimeout {
		n.log.Debug("serving without a returned member's subscriptions: its sync did not arrive", "topic", a.topic, "waited", time.Since(a.waitSince))
		a.ready, a.waitSince = true, time.Time{}
	}
	return v
}

// producerMustWait reports whether a batch of origin must be held back
// for its producer's order (batchOrigin.mustWaitFor).
func (a *topicActor) producerMustWait(o batchOrigin) bool {
	if o.producer == "" {
		return false
	}
	last, _ := a.producers.get(o.producer)
	return o.mustWaitFor(last)
}

// producerServed records a batch of origin as its producer's last accepted
// one. Only a batch that is served counts: one refused after the order
// check (the in-flight budget) and counted anyway let the producer's next
// batch, pipelined behind it, be served ahead of its retry, and the
// subscribers dropped the retry as OutOfOrder.
func (a *topicActor) producerServed(o batchOrigin) {
	if o.producer == "" {
		return
	}
	last, _ := a.producers.get(o.producer)
	// Past its bounds one is forgotten (producerMarks.put): at worst a
	// later batch of it waits for it to settle.
	a.producers.put(a.n, o.producer, max(last, o.seq))
}

// lastServed is the number of producer's last batch this actor served, 0
// when none (or forgotten).
func (a *topicActor) lastServed(producer string) uint64 {
	last, _ := a.producers.get(producer)
	return last
}

// noteDirect tells the registry that a request (or an eviction) added or
// removed a subscriber here: a member's answer the registry may still hand
// this actor can predate it, and the registry applies it on top
// (directRequests); if a view change clears this actor before it took its
// syncs, the registry keeps it too.
func (a *topicActor) noteDirect(id SubscriberID, inc uint64, subscribed bool) {
	synced := a.synced == a.epoch && a.syncedResync == a.n.owner.registry.resyncs.Load()
	a.n.owner.registry.recordDirect(a.topic, Member{ID: id.Node, Incarnation: inc}, id.Local, subscribed, synced)
}

func (a *topicActor) add(node string, inc uint64, local string) bool {
	if a.nodes == nil {
		a.nodes = make(map[string]*nodeSubscribers)
	}
	ns := a.nodes[node]
	if ns != nil && ns.inc != inc {
		a.dropNode(node) // subscribers of the node's previous life are gone
		ns = nil
	}
	if ns == nil {
		ns = &nodeSubscribers{inc: inc, set: make(map[string]struct{}, 1)}
		a.nodes[node] = ns
	}
	if _, ok := ns.set[local]; ok {
		return false
	}
	ns.set[local] = struct{}{}
	ns.list = nil
	a.countRecords(1)
	if g := groupOf(local); g != "" {
		a.groups.joined(g)
		a.publishGroupSizes()
	} else {
		a.groups.invalidate("")
	}
	return true
}

// countRecords changes the actor's count of subscriber records, and the
// node's over all its actors (ownerSide.records) with it.
func (a *topicActor) countRecords(delta int64) {
	a.count.Add(delta)
	a.n.owner.records.Add(delta)
}

// fits reports whether add may record id, of incarnation inc, within the
// owner's bound of subscriber records: it does when there is room, when id
// is recorded already (a repeated subscribe, or a sync offering what the
// actor holds, adds nothing), and when its node's records are of an
// earlier incarnation (add drops them first).
func (a *topicActor) fits(id SubscriberID, inc uint64) bool {
	if a.n.owner.recordsAdmit() {
		return true
	}
	ns := a.nodes[id.Node]
	if ns == nil {
		return false
	}
	if ns.inc != inc {
		return true
	}
	_, ok := ns.set[id.Local]
	return ok
}

// unsubscribe removes a subscriber that unsubscribed.
func (a *topicActor) unsubscribe(id SubscriberID) {
	if a.remove(id, true) {
		emit(a.n.events, SubscriberRemoved{Topic: a.topic, Subscriber: id, Group: id.Group()})
	} else if g := id.Group(); g != "" && a.groups.sizes[g] == 0 {
		// A batch evicted it as gone before its unsubscribe arrived (its
		// node drops it first): the group still ended by unsubscribing.
		delete(a.groups.vanished, g)
	}
}

// remove removes a subscriber: unsubscribed, or evicted.
func (a *topicActor) remove(id SubscriberID, unsubscribed bool) bool {
	ns := a.nodes[id.Node]
	if ns == nil {
		return false
	}
	if _, ok := ns.set[id.Local]; !ok {
		return false
	}
	delete(ns.set, id.Local)
	ns.list = nil
	a.countRecords(-1)
	if len(ns.set) == 0 {
		delete(a.nodes, id.Node)
	}
	delete(a.fails, id)
	a.groupLeft(groupOf(id.Local), unsubscribed)
	a.publishGroupSizes()
	return true
}

// groupLeft counts a member of group g out (groupBook.left) and logs a
// vanished group forgotten to make room.
func (a *topicActor) groupLeft(g string, unsubscribed bool) {
	if forgot := a.groups.left(g, unsubscribed); forgot != "" {
		if ok, held := a.n.log.limit.allow("vanished/" + a.topic); ok {
			a.n.log.Warn("vanished consumer group forgotten: acks no longer report it", "topic", a.topic, "group", forgot,
				"limit", maxVanishedGroups, "suppressed", held)
		}
	}
}

func (a *topicActor) dropNode(node string) {
	for l := range a.nodes[node].set {
		id := SubscriberID{Node: node, Local: l}
		delete(a.fails, id)
		a.groupLeft(id.Group(), false)
		emit(a.n.events, SubscriberRemoved{Topic: a.topic, Subscriber: id, Group: id.Group()})
	}
	a.countRecords(-int64(len(a.nodes[node].set)))
	delete(a.nodes, node)
	a.publishGroupSizes()
}

// check answers whether the actor can serve a request now.
func (a *topicActor) check() (*view, wire.Reply_Code) {
	v := a.reconcile()
	switch {
	case !a.owned:
		return v, wire.Reply_NOT_OWNER
	case !a.ready || !a.n.members.joined.Load() || !a.n.servesAsOwner():
		// Until Join has a stable view, this node's view may lack members
		// whose subscriptions it would then never ask for. Under
		// KeepMajority a node cut off from the majority serves nothing.
		return v, wire.Reply_NOT_READY
	}
	return v, wire.Reply_OK
}

// subscribe records (or removes) one subscriber. A topic gained but not yet
// ready still records it: the record is part of the state it will serve.
func (a *topicActor) subscribe(from *wire.MemberRef, local string, unsubscribe bool, answer func(ownerAnswer)) {
	v, code := a.check()
	if code == wire.Reply_NOT_OWNER || !v.has(from) {
		if code == wire.Reply_OK {
			code = wire.Reply_NOT_READY // we have not seen the sender join yet
		}
		answer(ownerAnswer{code: code, viewID: v.id})
		return
	}
	id := SubscriberID{Node: from.GetNodeId(), Local: local}
	if !unsubscribe && !a.fits(id, from.GetIncarnation()) {
		// NOT_READY: the subscriber retries within its deadline, and is
		// then told why (ErrTopicUnavailable with this reason).
		a.n.refuseRecords(a.topic, id.Node, 1)
		answer(ownerAnswer{code: wire.Reply_NOT_READY, viewID: v.id, reason: a.n.recordsRefusal()})
		return
	}
	a.noteDirect(id, from.GetIncarnation(), !unsubscribe)
	if unsubscribe {
		a.unsubscribe(id)
	} else if a.add(id.Node, from.GetIncarnation(), id.Local) {
		emit(a.n.events, SubscriberAdded{Topic: a.topic, Subscriber: id, Group: id.Group()})
	}
	answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id})
}

// publish fans an accepted batch out: one delivery per node, the local one by
// function call, and answers once every node reported or timed out.
//
// A batch that arrived over NATS stays packed: remote nodes get it as is,
// so it is never re-encoded message by message.
func (a *topicActor) publish(msgs payload, answer func(ownerAnswer)) {
	v, code := a.check()
	if code != wire.Reply_OK {
		ans := ownerAnswer{code: code, viewID: v.id}
		if code == wire.Reply_NOT_READY {
			ans.reason = a.n.notServingReason()
		}
		answer(ans)
		return
	}
	n := a.n
	if msgs.len() == 0 { // a readiness probe (Initialize)
		answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id, ack: PublishAck{Topic: a.topic, Status: Accepted}})
		return
	}
	if a.producerMustWait(msgs.origin) {
		// The producer's previous batch went to another owner (the topic
		// moved) and is not settled: serving this one now could put it
		// ahead at the subscribers, who would drop that one. The
		// publisher retries.
		answer(ownerAnswer{code: wire.Reply_ORDER_WAIT, viewID: v.id})
		return
	}
	size := msgs.bytes()
	if !n.owner.reserve(size) {
		answer(ownerAnswer{code: wire.Reply_OVERLOADED, viewID: v.id, reason: n.refuseOverBudget(a.topic)})
		return
	}
	a.producerServed(msgs.origin)
	a.seq++
	msgs.seq = batchSeq{owner: n.self.ID, inc: n.self.Incarnation, seq: a.seq}
	targets, reroute := a.targets(msgs)
	b := &pendingBatch{a: a, answer: answer, remaining: len(targets), wantIDs: msgs.wantIDs, reroute: reroute,
		reconnects: n.nc.Stats().Reconnects, bytes: int64(size)}
	if msgs.level != AckDelivered {
		// Answered now, with the batch accepted and its targets fixed, in
		// the same turn as the sends below: the answer is written to the
		// connection ahead of the deliveries, so it leaves first rather
		// than queue behind them (p50 about 5% lower on the latency
		// bench, 6 interleaved rounds). The outcomes still go to events,
		// eviction and at-least-once retries.
		b.answer = func(ownerAnswer) {}
		answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id,
			ack: PublishAck{Topic: a.topic, Status: Accepted, Messages: msgs.len(), Level: msgs.level}})
	}
	atLeastOnce := n.cfg.DeliveryMode(a.topic) == AtLeastOnce // the user's function: asked once per batch
	msgs.origin.atLeastOnce = atLeastOnce                     // for this node's own group members
	if reroute != nil {
		reroute.n, reroute.topic, reroute.seq, reroute.accepted = n, a.topic, a.seq, time.Now()
		reroute.atLeastOnce = atLeastOnce
	}
	b.ack = PublishAck{Topic: a.topic, Status: Accepted, Messages: msgs.len()}
	for g := range a.groups.vanished {
		b.ack.Failures = append(b.ack.Failures, DeliveryFailure{Group: g, Status: SubscriberGone})
	}
	n.stats.published.Add(uint64(msgs.len()))
	if len(targets) == 0 {
		n.owner.release(size)
		n.emitAccepted(b.ack)
		b.answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id, ack: b.ack})
		return
	}
	a.inflight++ // until account runs for b; the node's count since reserve
	a.armEarlyAnswer(b, msgs, targets)
	var head []byte // the encoded batch fields all remote nodes share, but the messages
	// Remote nodes first: their batches are on the wire while this node's
	// own subscribers get theirs.
	local := -1
	for i, t := range targets {
		if t.node == n.self.ID {
			local = i
			continue
		}
		m, ok := v.member(t.node)
		if !ok {
			b.report(t, fill(t.len(), SubscriberGone), nil, false, nil)
			continue
		}
		a.sendRemote(b, m, t, &msgs, &head, atLeastOnce)
	}
	if local >= 0 {
		t := targets[local]
		// A local delivery is never sent twice: a subscriber here that
		// dropped it as behind its mark had a forged one (see behind).
		n.deliver(a.topic, t.locals, t.shares, msgs, func(st []DeliveryStatus, processed, behind []uint32) { b.report(t, st, processed, false, behind) })
	}
}

// targets arranges a batch by node: without groups every subscriber of a
// node gets the whole batch; a group's members get their shares, and what
// re-routing a failed share needs is returned with them.
func (a *topicActor) targets(msgs payload) ([]nodeTarget, *reroutes) {
	skip := skipSet(msgs.skip)
	if len(a.groups.sizes) == 0 {
		out := make([]nodeTarget, 0, len(a.nodes))
		for node, ns := range a.nodes {
			locals := ns.locals()
			if skip != nil {
				if locals = skipped(node, locals, skip); len(locals) == 0 {
					continue // every subscriber there failed an earlier chunk
				}
			}
			out = append(out, nodeTarget{node: node, locals: locals})
		}
		return out, nil
	}
	p := a.plan()
	keys := msgs.keys()
	shares, replayed := p.assign(msgs.len(), keys, msgs.origin, a.n)
	r := &reroutes{msgs: msgs, keys: keys, groups: map[string]*groupRoute{}, replayed: replayed}
	for _, g := range p.groups {
		r.groups[g.name] = g
	}
	out := make([]nodeTarget, 0, len(a.nodes))
	for node := range a.nodes {
		t := nodeTarget{node: node, locals: skipped(node, p.broadcast[node], skip), shares: shares[node]}
		if len(t.locals) > 0 || len(t.shares) > 0 {
			out = append(out, t)
		}
	}
	return out, r
}

// skipSet is the set of a batch's skip list (the subscribers that failed
// an earlier chunk of it), nil when empty. A set: a forged request naming
// many subscribers costs one pass, not one per subscriber.
func skipSet(skip []*wire.Failure) map[SubscriberID]struct{} {
	if len(skip) == 0 {
		return nil
	}
	set := make(map[SubscriberID]struct{}, len(skip))
	for _, f := range skip {
		set[SubscriberID{Node: f.GetNode(), Local: f.GetLocal()}] = struct{}{}
	}
	return set
}

// skipped returns node's subscribers locals without those in skip; locals
// itself when none is.
func skipped(node string, locals []string, skip map[SubscriberID]struct{}) []string {
	if len(skip) == 0 {
		return locals
	}
	var out []string
	for i, l := range locals {
		_, gone := skip[SubscriberID{Node: node, Local: l}]
		switch {
		case gone && out == nil:
			out = append(make([]string, 0, len(locals)-1), locals[:i]...)
		case !gone && out != nil:
			out = append(out, l)
		}
	}
	if out == nil {
		return locals
	}
	return out
}
