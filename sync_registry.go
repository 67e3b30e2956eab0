package pubsub

import (
	"context"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// syncRegistry collects, for the owner's current view, the subscriptions of
// the topics it owns but does not hold yet, and says when a gained topic
// has them all (complete). What it asks for follows what changed:
//
//   - a member that joined (or came back): its own subscriptions;
//   - a member that left gracefully: its state as owner of the topics this
//     node gains from it (a handover, served while it drains);
//   - a member that vanished (crash, timeout), or a handover that could not
//     be given: every member's subscriptions again.
//
// Members that answered for an earlier view stay answered while no member
// vanishes: between such views this node only loses topics (to joiners) or
// gains them by handover, so their answers still cover what it owns.
type syncRegistry struct {
	n        *Node
	wake     chan struct{} // the sync loop has a new round to run
	mu       sync.Mutex
	view     *view
	round    context.Context // cancelled when the view changes
	cancel   context.CancelFunc
	answered map[string]uint64                         // member ID -> incarnation whose subscriptions are in subs
	handover map[string]Member                         // leavers whose handover this node awaits
	subs     map[string]map[string]map[string]struct{} // topic -> node -> subscribers, not yet taken
	complete bool
	// validFrom is the epoch of the last view a member vanished or left in:
	// answers asked for under views from it on are still valid.
	validFrom uint64
	resynced  uint64        // the view resync last asked every member again for
	gen       uint64        // counts resets, resyncs, completions and pending topics: what a handover's topic list was built under
	resyncs   atomic.Uint64 // resyncs done: actors that took this view's syncs take a resync's too (topicActor.syncedResync)
	direct    directRequests
}

// viewChange is what a new view changed that the registry must ask about.
type viewChange struct {
	lost    bool     // a member vanished without a graceful leave
	leavers []Member // members that left gracefully
}

// maxSyncPullers bounds the members asked at once: a view of forged members
// costs a few goroutines, not one per member.
const maxSyncPullers = 8

func (r *syncRegistry) init(n *Node) {
	r.n = n
	r.wake = make(chan struct{}, 1)
	r.answered = map[string]uint64{}
	r.handover = map[string]Member{}
	r.subs = map[string]map[string]map[string]struct{}{}
}

// reset starts collecting for v, with this node's own subscriptions (self,
// listed after stamp since: see directRequests). Called with members.mu
// held, in view order.
func (r *syncRegistry) reset(v *view, self []*wire.TopicSubscribers, since uint64, change viewChange) {
	r.mu.Lock()
	r.gen++
	if r.cancel == nil || change.lost || len(change.leavers) > 0 {
		// Answers asked for under earlier views no longer cover what this
		// node may own: stop asking, and drop those still in flight.
		if r.cancel != nil {
			r.cancel()
		}
		r.round, r.cancel = context.WithCancel(r.n.life.ctx)
		r.validFrom = v.epoch
	}
	// Otherwise only members joined: answers to requests made under an
	// earlier view still cover this node's (smaller) share, so requests
	// in flight go on and count.
	r.view, r.complete = v, false
	if change.lost {
		clear(r.answered)
		clear(r.handover)
	}
	for id, inc := range r.answered {
		if !v.holds(Member{ID: id, Incarnation: inc}) {
			delete(r.answered, id)
			r.dropNodeLocked(id)
		}
	}
	for _, m := range change.leavers {
		r.handover[m.ID] = m
		r.dropNodeLocked(m.ID)
	}
	for id := range r.handover {
		if _, back := v.member(id); back {
			delete(r.handover, id) // it joined again: asked as a joiner
		}
	}
	for t := range r.subs {
		if v.ownerOf(t).ID != r.n.self.ID {
			delete(r.subs, t) // moved to a joiner
		}
	}
	r.direct.retain(v, r.n.self.ID)
	r.answerLocked(r.n.self, self, since)
	done := r.checkLocked()
	r.mu.Unlock()
	r.poke()
	if done {
		r.n.refreshTopics()
	}
}

func (r *syncRegistry) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// syncLoop runs one round per view change, until the node closes. A round
// is abandoned as soon as the view changes again.
func (n *Node) syncLoop() {
	defer n.life.goroutines.done()
	for {
		select {
		case <-n.life.ctx.Done():
			return
		case <-n.owner.registry.wake:
		}
		n.owner.registry.pullRound()
	}
}

// pullRound asks every member not yet answered, and every leaver for its
// handover, at most maxSyncPullers at once.
func (r *syncRegistry) pullRound() {
	type job struct {
		m        Member
		handover bool
	}
	r.mu.Lock()
	v, ctx := r.view, r.round
	var jobs []job
	for _, m := range v.members {
		if inc, ok := r.answered[m.ID]; !ok || inc != m.Incarnation {
			jobs = append(jobs, job{m: m})
		}
	}
	for _, m := range r.handover {
		jobs = append(jobs, job{m: m, handover: true})
	}
	r.mu.Unlock()
	if len(jobs) == 0 || ctx.Err() != nil {
		return
	}
	queue := make(chan job)
	var wg sync.WaitGroup
	for range min(maxSyncPullers, len(jobs)) {
		wg.Go(func() {
			for j := range queue {
				if j.handover {
					r.pullHandover(ctx, v, j.m)
				} else {
					r.pullMember(ctx, v, j.m)
				}
			}
		})
	}
feed:
	for _, j := range jobs {
		select {
		case queue <- j:
		case <-ctx.Done():
			break feed
		}
	}
	close(queue)
	wg.Wait()
}

// applyPulled records member m's subscriptions for v, replacing what it
// answered before; its pull was sent at stamp since (directRequests).
func (r *syncRegistry) applyPulled(v *view, m Member, topics []*wire.TopicSubscribers, since uint64) {
	r.apply(v, func() { r.answerLocked(m, topics, since) })
}

// applyHandover records a leaver's state of the topics this node gains from it.
func (r *syncRegistry) applyHandover(v *view, leaver string, topics []*wire.TopicSubscribers) {
	r.apply(v, func() {
		delete(r.handover, leaver)
		for _, t := range topics {
			if m, ok := v.member(t.GetNode()); ok && m.ID != leaver {
				r.addLocked(m.ID, t)
			}
		}
	})
}

// fallBack gives up on the handovers of v: every member is asked again.
func (r *syncRegistry) fallBack(v *view) {
	r.apply(v, func() {
		clear(r.handover)
		for id := range r.answered {
			if id != r.n.self.ID {
				delete(r.answered, id)
			}
		}
	})
	r.poke()
}

// resync asks every member again for v. A topic actor that slept through
// several views and cannot prove it owned its topic throughout (the view
// history is bounded) rebuilds from the registry, which after leaves and
// joins holds only the leavers' and joiners' share: without every member's
// answer it would come back ready without its other subscribers. Until
// they answered, no gained topic completes. At most once per view.
func (r *syncRegistry) resync(v *view) {
	r.mu.Lock()
	if r.view != v || r.resynced == v.epoch {
		r.mu.Unlock()
		return
	}
	r.resynced = v.epoch
	r.gen++
	r.resyncs.Add(1)
	for id := range r.answered {
		if id != r.n.self.ID {
			delete(r.answered, id)
		}
	}
	r.complete = false
	r.mu.Unlock()
	r.poke()
}

func (r *syncRegistry) apply(v *view, change func()) {
	r.mu.Lock()
	if v.epoch < r.validFrom {
		r.mu.Unlock()
		return
	}
	change()
	done := r.checkLocked()
	r.mu.Unlock()
	if done {
		r.n.refreshTopics()
	}
}

// answerLocked replaces member m's subscriptions with topics; the answer
// covers the requests it made up to stamp since (directRequests).
func (r *syncRegistry) answerLocked(m Member, topics []*wire.TopicSubscribers, since uint64) {
	r.dropNodeLocked(m.ID)
	r.direct.answered(m.ID, since)
	r.answered[m.ID] = m.Incarnation
	for _, t := range topics {
		r.addLocked(m.ID, t)
	}
}

func (r *syncRegistry) addLocked(node string, t *wire.TopicSubscribers) {
	if len(t.GetSubscribers()) == 0 || validateTopic(t.GetTopic()) != nil || r.view.ownerOf(t.GetTopic()).ID != r.n.self.ID {
		return
	}
	byNode := r.subs[t.GetTopic()]
	if byNode == nil {
		byNode = map[string]map[string]struct{}{}
		r.subs[t.GetTopic()] = byNode
		r.gen++ // a topic pending: a leaver's handover list must include it
	}
	set := byNode[node]
	if set == nil {
		set = map[string]struct{}{}
		byNode[node] = set
	}
	for _, l := range t.GetSubscribers() {
		if len(l) > maxLocalIDLen { // no node names a subscriber so: counted, not kept
			r.n.malformed("sync", len(l))
			continue
		}
		set[l] = struct{}{}
	}
}

func (r *syncRegistry) dropNodeLocked(node string) {
	for t, byNode := range r.subs {
		delete(byNode, node)
		if len(byNode) == 0 {
			delete(r.subs, t)
		}
	}
}

// checkLocked marks the registry complete once every member answered and
// every handover arrived; it reports whether this call completed it.
func (r *syncRegistry) checkLocked() bool {
	if r.complete || len(r.handover) > 0 {
		return false
	}
	for _, m := range r.view.members {
		if inc, ok := r.answered[m.ID]; !ok || inc != m.Incarnation {
			return false
		}
	}
	r.complete = true
	r.gen++
	return true
}

// take hands a gained topic its subscribers once the registry is complete
// for the view of epoch.
func (r *syncRegistry) take(topic string, epoch uint64) (map[string][]string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.view.epoch != epoch || !r.complete {
		return nil, false
	}
	byNode := r.direct.applyTo(topic, r.subs[topic], r.view)
	delete(r.subs, topic)
	subs := make(map[string][]string, len(byNode))
	for node, set := range byNode {
		subs[node] = slices.Collect(maps.Keys(set))
	}
	return subs, true
}

// recordDirect notes that topic's actor applied a subscribe (subscribed),
// an unsubscribe or an eviction of from's subscriber local
// (directRequests). It is kept while answers may still reach the actor:
// the actor has not taken this view's syncs (synced false), the registry
// collects answers again, or holds some for topic not taken yet. Otherwise
// the request replaces nothing and any older one held for the subscriber
// is forgotten. A node past the bound has its request dropped: counted
// and logged.
func (r *syncRegistry) recordDirect(topic string, from Member, local string, subscribed, synced bool) {
	r.mu.Lock()
	ok := true
	switch {
	case r.view.ownerOf(topic).ID != r.n.self.ID:
		// Moved away (an actor not reconciled to the view yet): nothing
		// here will take it.
	case !synced || !r.complete || r.subs[topic] != nil:
		ok = r.direct.record(topic, from, local, subscribed)
	default:
		r.direct.forget(topic, from.ID, local)
	}
	r.mu.Unlock()
	if !ok {
		r.n.malformed("sync", len(local))
		if allowed, suppressed := r.n.log.limit.allow("sync/direct"); allowed {
			r.n.log.Warn("owner: a member's subscribe requests past its subscription bound, not kept for the sync in progress",
				"topic", topic, "member", from.ID, "limit", maxSubscriptions, "suppressed", suppressed)
		}
	}
}

// stamp is the stamp a pull sent now, or a snapshot of this node's own
// subscriptions taken now, covers requests up to (directRequests).
func (r *syncRegistry) stamp() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.direct.stamp()
}

// completeGen reports whether the registry is complete for its view, and
// its generation (syncRegistry.gen).
func (r *syncRegistry) completeGen() (bool, uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.complete, r.gen
}

// hasPending reports whether topic has synced subscribers, or requests
// (directRequests), not yet taken.
func (r *syncRegistry) hasPending(topic string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.subs[topic] != nil || r.direct.byTopic[topic] != nil
}

// topicsPending lists the topics that have synced subscribers, or requests,
// not yet taken.
func (r *syncRegistry) topicsPending() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	topics := slices.Collect(maps.Keys(r.subs))
	for t := range r.direct.byTopic {
		if r.subs[t] == nil {
			topics = append(topics, t)
		}
	}
	return topics
}
