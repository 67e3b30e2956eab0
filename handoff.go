package pubsub

import (
	"context"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Ownership handoff, pulled by the owner. When a node's view changes to V,
// its sync loop asks every member of V for that member's subscriptions of
// the topics this node owns under V, naming V's members in the request so the
// member can compute ownership whatever its own view is. An owner keeps
// serving the topics it owned throughout; a topic it gained becomes ready
// once every member of V answered.
//
// Pulling, rather than each member pushing when its own view changes, is what
// makes asymmetric view changes harmless: a node whose peers dropped and
// re-added it (a one-way route stall, a forged LEAVE) never changed its own
// view, yet every peer that did asks it again. It also needs no buffer for
// syncs of views not reached yet, so forged syncs cannot fill memory.
//
// A member also pushes, unasked, its subscriptions of topics whose owner
// changed in its own view, to the new owner: that owner may have owned the
// topic all along in its view and so never ask.
type syncRegistry struct {
	n        *Node
	wake     chan struct{} // the sync loop has a new round to run
	mu       sync.Mutex
	view     *view
	round    context.Context // cancelled when the view changes
	cancel   context.CancelFunc
	from     map[string]bool                // members whose subscriptions arrived
	subs     map[string]map[string][]string // topic -> node -> subscribers
	complete bool
}

// maxSyncPullers bounds the members asked at once: a view of forged members
// costs a few goroutines, not one per member.
const maxSyncPullers = 8

func (r *syncRegistry) init(n *Node) {
	r.n = n
	r.wake = make(chan struct{}, 1)
}

// reset starts collecting for v, with this node's own subscriptions. Called
// with members.mu held, in view order.
func (r *syncRegistry) reset(v *view, self []*wire.TopicSubscribers) {
	r.mu.Lock()
	if r.cancel != nil {
		r.cancel()
	}
	r.round, r.cancel = context.WithCancel(r.n.life.ctx)
	r.view, r.from, r.subs, r.complete = v, map[string]bool{}, map[string]map[string][]string{}, false
	r.addLocked(r.n.self.ID, self)
	done := r.checkLocked()
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
	if done {
		r.n.refreshTopics()
	}
}

// syncLoop runs one pull round per view change, until the node closes. A
// round is abandoned as soon as the view changes again.
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

// pullRound asks every member not yet heard for the current view.
func (r *syncRegistry) pullRound() {
	r.mu.Lock()
	v, ctx := r.view, r.round
	var missing []Member
	for _, m := range v.members {
		if !r.from[m.ID] {
			missing = append(missing, m)
		}
	}
	r.mu.Unlock()
	if len(missing) == 0 || ctx.Err() != nil {
		return
	}
	jobs := make(chan Member)
	var wg sync.WaitGroup
	for range min(maxSyncPullers, len(missing)) {
		wg.Go(func() {
			for m := range jobs {
				r.pullMember(ctx, v, m)
			}
		})
	}
feed:
	for _, m := range missing {
		select {
		case jobs <- m:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
}

// pullMember asks m, page by page, for its subscriptions of the topics this
// node owns under v, retrying until m answers, the view changes or the node
// closes.
func (r *syncRegistry) pullMember(ctx context.Context, v *view, m Member) {
	n := r.n
	req := &wire.SyncRequest{From: n.selfRef(), ViewId: v.id, Members: v.refs()}
	env := &wire.Envelope{Body: &wire.Envelope_SyncRequest{SyncRequest: req}}
	var topics []*wire.TopicSubscribers
	for ctx.Err() == nil {
		var page *wire.Sync
		n.retry(ctx, func() bool {
			rep, err := n.rpc.callEnvelope(ctx, m.Inbox, env, callOpts{timeout: n.cfg.RequestTimeout})
			page = rep.GetSync()
			if err != nil || rep.GetCode() != wire.Reply_OK || page == nil ||
				page.GetFrom().GetNodeId() != m.ID || page.GetFrom().GetIncarnation() != m.Incarnation {
				// Unreachable, or its incarnation is not the one in v (it
				// restarted, or v holds a forged one): v will change.
				n.log.Debug("sync not answered, retrying", "member", m.ID, "err", err, "code", rep.GetCode())
				return false
			}
			return true
		})
		if ctx.Err() != nil {
			return
		}
		topics = append(topics, page.GetTopics()...)
		last := page.GetTopics()
		if !page.GetMore() || len(last) == 0 || len(last[len(last)-1].GetSubscribers()) == 0 {
			r.applyPulled(v, m.ID, topics)
			return
		}
		t := last[len(last)-1]
		req.AfterTopic, req.AfterSubscriber = t.GetTopic(), t.GetSubscribers()[len(t.GetSubscribers())-1]
	}
}

// applyPulled records member node's subscriptions for v.
func (r *syncRegistry) applyPulled(v *view, node string, topics []*wire.TopicSubscribers) {
	r.mu.Lock()
	if r.view != v || r.complete {
		r.mu.Unlock()
		return
	}
	r.addLocked(node, topics)
	done := r.checkLocked()
	r.mu.Unlock()
	if done {
		r.n.refreshTopics()
	}
}

func (r *syncRegistry) addLocked(node string, topics []*wire.TopicSubscribers) {
	r.from[node] = true
	for _, t := range topics {
		if len(t.GetSubscribers()) == 0 || validateTopic(t.GetTopic()) != nil || r.view.ownerOf(t.GetTopic()).ID != r.n.self.ID {
			continue
		}
		m := r.subs[t.GetTopic()]
		if m == nil {
			m = make(map[string][]string)
			r.subs[t.GetTopic()] = m
		}
		m[node] = append(m[node], t.GetSubscribers()...)
	}
}

// checkLocked marks the registry complete once every member answered; it
// reports whether this call completed it.
func (r *syncRegistry) checkLocked() bool {
	if r.complete {
		return false
	}
	for _, m := range r.view.members {
		if !r.from[m.ID] {
			return false
		}
	}
	r.complete = true
	return true
}

// take hands a gained topic its subscribers once every member answered for
// the view of epoch.
func (r *syncRegistry) take(topic string, epoch uint64) (map[string][]string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.view.epoch != epoch || !r.complete {
		return nil, false
	}
	subs := r.subs[topic]
	delete(r.subs, topic)
	return subs, true
}

// hasPending reports whether topic has synced subscribers not yet taken.
func (r *syncRegistry) hasPending(topic string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.subs[topic] != nil
}

// topicsPending lists the topics that have synced subscribers not yet taken.
func (r *syncRegistry) topicsPending() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Collect(maps.Keys(r.subs))
}

// viewChanged runs on the control actor, in view order. Under a burst of view
// changes (a flood of forged members) only the latest view does the work.
func (n *Node) viewChanged(prev, next *view) {
	for _, m := range next.members {
		if _, ok := prev.member(m.ID); !ok {
			n.log.Info("member joined", "member", m.ID, "members", len(next.members))
			emit(n.events, MemberJoined{Member: m, Members: len(next.members)})
		}
	}
	for _, m := range prev.members {
		if cur, ok := next.member(m.ID); !ok || cur.Incarnation != m.Incarnation {
			n.log.Info("member left", "member", m.ID, "members", len(next.members))
			emit(n.events, MemberLeft{Member: m, Members: len(next.members)})
		}
	}
	if n.view() != next {
		return // a newer view is queued behind this one
	}
	n.refreshTopics()
	if n.members.pushed != nil {
		n.pushMoved(n.members.pushed, next)
	}
	n.members.pushed = next
}

// pushMoved sends each new owner this node's subscriptions of the topics it
// gained between views prev and next.
func (n *Node) pushMoved(prev, next *view) {
	byOwner := map[string]map[string]*wire.TopicSubscribers{}
	n.subscriber.each(func(local string, s *Subscription) {
		owner := next.ownerOf(s.topic).ID
		if owner == n.self.ID || prev.ownerOf(s.topic).ID == owner {
			return
		}
		topics := byOwner[owner]
		if topics == nil {
			topics = map[string]*wire.TopicSubscribers{}
			byOwner[owner] = topics
		}
		t := topics[s.topic]
		if t == nil {
			t = &wire.TopicSubscribers{Topic: s.topic}
			topics[s.topic] = t
		}
		t.Subscribers = append(t.Subscribers, local)
	})
	for owner, topics := range byOwner {
		m, _ := next.member(owner)
		list := make([]*wire.TopicSubscribers, 0, len(topics))
		for _, t := range topics {
			list = append(list, t)
		}
		for _, part := range splitSync(list, n.maxPayload()/2) {
			env := &wire.Envelope{Body: &wire.Envelope_Sync{Sync: &wire.Sync{From: n.selfRef(), ViewId: next.id, Topics: part}}}
			n.pushSync(next, m, env, 5*time.Millisecond)
		}
	}
}

// pushSync sends one pushed sync, retrying with backoff (up to a second)
// until the owner takes it or this node's view changes, when the next view's
// pushes replace it. An owner that does not know this node yet answers
// NOT_READY, and is asked again.
func (n *Node) pushSync(v *view, m Member, env *wire.Envelope, backoff time.Duration) {
	if n.life.ctx.Err() != nil || n.view() != v {
		return
	}
	n.rpc.sendEnvelope(m.Inbox, env, n.cfg.RequestTimeout, func(rep *wire.Reply, err error) {
		if err != nil || rep.GetCode() != wire.Reply_OK {
			next := min(2*backoff, time.Second)
			time.AfterFunc(backoff, func() { n.pushSync(v, m, env, next) })
		}
	})
}

// splitSync cuts a topic list into parts that each fit in limit bytes; there
// is always at least one part, possibly empty.
func splitSync(topics []*wire.TopicSubscribers, limit int) [][]*wire.TopicSubscribers {
	var parts [][]*wire.TopicSubscribers
	var cur []*wire.TopicSubscribers
	size := 0
	for _, t := range topics {
		sz := len(t.GetTopic()) + 8
		for _, s := range t.GetSubscribers() {
			sz += len(s) + 4
		}
		if sz > limit && len(t.GetSubscribers()) > 1 {
			// One topic with more subscribers than fit: split its list.
			half := len(t.GetSubscribers()) / 2
			a := &wire.TopicSubscribers{Topic: t.GetTopic(), Subscribers: t.GetSubscribers()[:half]}
			b := &wire.TopicSubscribers{Topic: t.GetTopic(), Subscribers: t.GetSubscribers()[half:]}
			parts = append(parts, splitSync([]*wire.TopicSubscribers{a, b}, limit)...)
			continue
		}
		if size+sz > limit && len(cur) > 0 {
			parts = append(parts, cur)
			cur, size = nil, 0
		}
		cur = append(cur, t)
		size += sz
	}
	if len(cur) > 0 || len(parts) == 0 {
		parts = append(parts, cur)
	}
	return parts
}

// onSyncRequest answers a member pulling this node's subscriptions for its
// view: one page, sorted by (topic, subscriber), after the request's cursor.
// The requester's view need not be ours: ownership is computed over the
// members it names.
func (n *Node) onSyncRequest(req *wire.SyncRequest, reply string) {
	owner := req.GetFrom().GetNodeId()
	v, self := viewOf(req.GetMembers(), n.self.ID)
	if owner == "" || v == nil || len(req.GetMembers()) > n.cfg.MaxMembers {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid sync request"})
		return
	}
	if self.Incarnation != n.self.Incarnation {
		// The requester's view holds another incarnation of this node; it
		// must see this one join first.
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_READY, ViewId: n.view().id})
		return
	}
	page := syncPage(n.subscriptionsOwnedBy(v, owner), req.GetAfterTopic(), req.GetAfterSubscriber(), n.maxPayload()/2)
	page.From, page.ViewId = n.selfRef(), req.GetViewId()
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK, ViewId: n.view().id, Sync: page})
}

// syncPage returns the sorted entries after the cursor (afterTopic,
// afterSub), grouped by topic, up to about limit bytes; More says whether
// entries remain.
func syncPage(entries [][2]string, afterTopic, afterSub string, limit int) *wire.Sync {
	cursor := [2]string{afterTopic, afterSub}
	i, found := slices.BinarySearchFunc(entries, cursor, compareEntries)
	if found {
		i++
	}
	page := &wire.Sync{}
	for size := 0; i < len(entries) && size < limit; i++ {
		e := entries[i]
		if k := len(page.Topics); k == 0 || page.Topics[k-1].Topic != e[0] {
			page.Topics = append(page.Topics, &wire.TopicSubscribers{Topic: e[0]})
			size += len(e[0]) + 8
		}
		t := page.Topics[len(page.Topics)-1]
		t.Subscribers = append(t.Subscribers, e[1])
		size += len(e[1]) + 4
	}
	page.More = i < len(entries)
	return page
}

func compareEntries(a, b [2]string) int {
	if c := strings.Compare(a[0], b[0]); c != 0 {
		return c
	}
	return strings.Compare(a[1], b[1])
}

// subscriptionsOwnedBy lists, sorted, the (topic, subscriber) pairs of this
// node whose topic owner owns under v.
func (n *Node) subscriptionsOwnedBy(v *view, owner string) [][2]string {
	var out [][2]string
	n.subscriber.each(func(local string, s *Subscription) {
		if v.ownerOf(s.topic).ID == owner {
			out = append(out, [2]string{s.topic, local})
		}
	})
	slices.SortFunc(out, compareEntries)
	return out
}

// viewOf builds the view a requester named, and finds this node in it; nil
// when the list is invalid or lacks this node.
func viewOf(refs []*wire.MemberRef, self string) (*view, Member) {
	members := make([]Member, 0, len(refs))
	var me Member
	found := false
	for _, r := range refs {
		if r.GetNodeId() == "" {
			return nil, Member{}
		}
		m := Member{ID: r.GetNodeId(), Incarnation: r.GetIncarnation()}
		if m.ID == self {
			me, found = m, true
		}
		members = append(members, m)
	}
	if !found {
		return nil, Member{}
	}
	return newView(0, members), me
}

// onSync merges subscriptions a member pushed because the topics' owner
// changed in its view: like subscribe requests, recorded by a topic this node
// owns whether or not it is ready yet.
func (n *Node) onSync(s *wire.Sync, reply string) {
	v := n.view()
	if !v.has(s.GetFrom()) {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_READY, ViewId: v.id})
		return
	}
	from := s.GetFrom()
	for _, t := range s.GetTopics() {
		if validateTopic(t.GetTopic()) != nil || v.ownerOf(t.GetTopic()).ID != n.self.ID {
			continue
		}
		locals := t.GetSubscribers()
		n.owner.onActor(t.GetTopic(), false, func(a *topicActor) {
			for _, l := range locals {
				a.subscribe(from, l, false, func(ownerAnswer) {})
			}
		})
	}
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK, ViewId: v.id})
}
