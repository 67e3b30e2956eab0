package pubsub

import (
	"sync"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Ownership handoff. When a node's view changes to V, it sends every member M
// one Sync{V} holding its subscriptions of all the topics M owns under V
// (empty ones too). An owner keeps serving topics it owned throughout; a
// topic it gained becomes ready once it has a Sync{V} from every member of V.
// The syncRegistry collects those syncs for the current view.
type syncRegistry struct {
	n        *Node
	mu       sync.Mutex
	view     *view
	from     map[string]bool                // members whose sync is complete
	parts    map[string]map[uint32]bool     // parts received of split syncs
	subs     map[string]map[string][]string // topic -> node -> subscribers
	complete bool
	// future keeps the latest sync of each sender for a view this node has
	// not reached yet; it is replayed when it does.
	future map[futureKey]*wire.Sync
}

const maxFutureSyncs = 4096

func (r *syncRegistry) init(n *Node) {
	r.n = n
	r.future = make(map[futureKey]*wire.Sync)
}

// reset starts collecting for v, with this node's own sync. Called with memMu
// held, in view order.
func (r *syncRegistry) reset(v *view, self []*wire.TopicSubscribers) {
	r.mu.Lock()
	r.view, r.from, r.subs, r.complete = v, map[string]bool{}, map[string]map[string][]string{}, false
	r.parts = map[string]map[uint32]bool{}
	r.addLocked(&wire.Sync{From: r.n.selfRef(), ViewId: v.id, Topics: self})
	for key, s := range r.future {
		if s.GetViewId() == v.id {
			delete(r.future, key)
			if v.has(s.GetFrom()) {
				r.addLocked(s)
			}
		}
	}
	done := r.checkLocked()
	r.mu.Unlock()
	if done {
		r.n.refreshTopics()
	}
}

// apply records a member's sync; one for another view is kept for later.
func (r *syncRegistry) apply(s *wire.Sync) {
	r.mu.Lock()
	if s.GetViewId() != r.view.id {
		key := futureKey{s.GetFrom().GetNodeId(), s.GetPart()}
		if old := r.future[key]; old != nil || len(r.future) < maxFutureSyncs {
			if old == nil || old.GetViewId() != s.GetViewId() || s.GetParts() != old.GetParts() {
				r.dropFutureLocked(key.node) // a newer view of the sender replaces all its parts
			}
			r.future[key] = s
		}
		r.mu.Unlock()
		return
	}
	if !r.view.has(s.GetFrom()) || r.complete {
		r.mu.Unlock()
		return
	}
	r.addLocked(s)
	done := r.checkLocked()
	r.mu.Unlock()
	if done {
		r.n.refreshTopics()
	}
}

func (r *syncRegistry) dropFutureLocked(node string) {
	for k := range r.future {
		if k.node == node {
			delete(r.future, k)
		}
	}
}

// futureKey names one part of a member's sync kept for a later view.
type futureKey struct {
	node string
	part uint32
}

func (r *syncRegistry) addLocked(s *wire.Sync) {
	node := s.GetFrom().GetNodeId()
	if parts := max(s.GetParts(), 1); parts == 1 {
		r.from[node] = true
	} else {
		got := r.parts[node]
		if got == nil {
			got = make(map[uint32]bool, parts)
			r.parts[node] = got
		}
		got[s.GetPart()] = true
		r.from[node] = len(got) >= int(parts)
	}
	for _, t := range s.GetTopics() {
		if len(t.GetSubscribers()) == 0 || r.view.ownerOf(t.GetTopic()).ID != r.n.id {
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

// checkLocked marks the registry complete once every member synced; it
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

// take hands a gained topic its subscribers once every member synced for the
// view of epoch.
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

// topicsPending lists the topics that have synced subscribers not yet taken.
func (r *syncRegistry) topicsPending() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ts := make([]string, 0, len(r.subs))
	for t := range r.subs {
		ts = append(ts, t)
	}
	return ts
}

// refreshTopics makes every actor reconcile with the current view, creating
// actors for topics whose subscribers arrived by sync.
func (n *Node) refreshTopics() {
	for _, t := range n.registry.topicsPending() {
		n.actor(t)
	}
	n.topicsMu.Lock()
	actors := make([]*topicActor, 0, len(n.topics))
	for _, a := range n.topics {
		actors = append(actors, a)
	}
	n.topicsMu.Unlock()
	for _, a := range actors {
		a.s.do(func() { a.reconcile() })
	}
}

// viewChanged runs on the control actor, in view order.
func (n *Node) viewChanged(prev, next *view) {
	for _, m := range next.members {
		if _, ok := prev.member(m.ID); !ok {
			n.log.Info("member joined", "member", m.ID, "members", len(next.members))
			n.events.emit(MemberJoined{Node: n.id, Member: m, Members: len(next.members), Time: time.Now()})
		}
	}
	for _, m := range prev.members {
		if cur, ok := next.member(m.ID); !ok || cur.Incarnation != m.Incarnation {
			n.log.Info("member left", "member", m.ID, "members", len(next.members))
			n.events.emit(MemberLeft{Node: n.id, Member: m, Members: len(next.members), Time: time.Now()})
		}
	}
	n.refreshTopics()
	for _, m := range next.members {
		if m.ID != n.id {
			n.goroutines.add()
			go n.sendSync(next, m)
		}
	}
}

// sendSync delivers this node's sync for v to m, retrying each part until m
// acknowledges it, the view changes, or the node closes.
func (n *Node) sendSync(v *view, m Member) {
	defer n.goroutines.done()
	parts := splitSync(n.localSync(v, m.ID), n.MaxMessageSize())
	for i, topics := range parts {
		sync := &wire.Sync{From: n.selfRef(), ViewId: v.id, Topics: topics, Part: uint32(i), Parts: uint32(len(parts))}
		env := &wire.Envelope{Body: &wire.Envelope_Sync{Sync: sync}}
		backoff := 5 * time.Millisecond
		for {
			if n.view().id != v.id || n.ctx.Err() != nil {
				return // a newer view sends its own syncs
			}
			rep, err := n.rpc.call(n.ctx, m.Inbox, env, n.cfg.RequestTimeout, nil, 0, nil)
			if err == nil && rep.GetCode() != wire.Reply_BAD_REQUEST {
				break
			}
			n.log.Debug("sync not acknowledged, retrying", "member", m.ID, "err", err)
			if !n.pause(n.ctx, &backoff, 500*time.Millisecond) {
				return
			}
		}
	}
}

// splitSync cuts a sync's topic list into parts that each fit in limit
// bytes; there is always at least one part, possibly empty.
func splitSync(topics []*wire.TopicSubscribers, limit int) [][]*wire.TopicSubscribers {
	var parts [][]*wire.TopicSubscribers
	var cur []*wire.TopicSubscribers
	size := 0
	for _, t := range topics {
		sz := len(t.GetTopic()) + 8
		for _, s := range t.GetSubscribers() {
			sz += len(s) + 4
		}
		if sz > limit {
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

// localSync lists this node's subscriptions of the topics owner owns under v.
func (n *Node) localSync(v *view, owner string) []*wire.TopicSubscribers {
	n.subsMu.RLock()
	defer n.subsMu.RUnlock()
	byTopic := map[string]*wire.TopicSubscribers{}
	var out []*wire.TopicSubscribers
	for local, s := range n.subs {
		if v.ownerOf(s.topic).ID != owner {
			continue
		}
		t := byTopic[s.topic]
		if t == nil {
			t = &wire.TopicSubscribers{Topic: s.topic}
			byTopic[s.topic] = t
			out = append(out, t)
		}
		t.Subscribers = append(t.Subscribers, local)
	}
	return out
}

func (n *Node) onSync(s *wire.Sync, reply string) {
	if s.GetFrom() == nil {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "sync without sender"})
		return
	}
	n.registry.apply(s)
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK, ViewId: n.view().id})
}
