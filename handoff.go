package pubsub

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// pullMember asks m, page by page, for its subscriptions of the topics this
// node owns under v, retrying until m answers, the view changes or the node
// closes.
func (r *syncRegistry) pullMember(ctx context.Context, v *view, m Member) {
	n := r.n
	req := &wire.SyncRequest{From: n.selfRef(), ViewId: v.id, Members: v.refs()}
	env := &wire.Envelope{Body: &wire.Envelope_SyncRequest{SyncRequest: req}}
	var topics []*wire.TopicSubscribers
	held := 0          // subscribers in topics
	since := r.stamp() // the answer covers the requests recorded until now
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
		last := page.GetTopics()
		for _, t := range last {
			held += len(t.GetSubscribers())
		}
		if limit := n.subscriber.limit(); held > limit {
			// A member holds at most as many subscriptions as this node
			// may (maxSubscriptions): one that pages past them is broken
			// or forged, and would grow this list while it answers.
			n.stats.malformed.Add(1)
			n.log.Warn("sync pull: a member listed more subscriptions than a node may hold; keeping the pages before", "member", m.ID,
				"listed", held, "limit", limit)
			r.applyPulled(v, m, topics, since)
			return
		}
		if !page.GetMore() || len(last) == 0 || len(last[len(last)-1].GetSubscribers()) == 0 {
			r.applyPulled(v, m, append(topics, last...), since)
			return
		}
		t := last[len(last)-1]
		topic, subscriber := t.GetTopic(), t.GetSubscribers()[len(t.GetSubscribers())-1]
		if compareEntries([2]string{topic, subscriber}, [2]string{req.AfterTopic, req.AfterSubscriber}) <= 0 {
			// Pages come sorted after the cursor (syncPage): one that
			// does not move it would have this loop ask for the same
			// page, and keep it, for as long as the view lasts.
			n.stats.malformed.Add(1)
			n.log.Warn("sync pull: a page that does not advance past the last one; keeping the pages before it", "member", m.ID,
				"after_topic", req.AfterTopic, "after_subscriber", req.AfterSubscriber)
			r.applyPulled(v, m, topics, since)
			return
		}
		topics = append(topics, last...)
		req.AfterTopic, req.AfterSubscriber = topic, subscriber
	}
}

// viewChanged runs on the control actor, in view order. Under a burst of view
// changes (a flood of forged members) only the latest view does the work.
func (n *Node) viewChanged(prev, next *view) {
	// Requests in flight to members that left give up a heartbeat later:
	// a member that leaves gracefully answers them while it drains.
	n.rpc.sweepAfter(n.cfg.HeartbeatInterval)
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
	// Held from the snapshot to the last write: an Unsubscribe of a
	// subscriber the snapshot names sends its request after the push.
	n.subscriber.pushMu.Lock()
	defer n.subscriber.pushMu.Unlock()
	byOwner := map[string]map[string]*wire.TopicSubscribers{}
	n.subscriber.each(func(local string, s *Subscription) {
		owner := next.ownerOf(s.topic).ID
		if owner == "" || owner == n.self.ID || prev.ownerOf(s.topic).ID == owner {
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
	if h := n.cfg.pushHook; h != nil && len(byOwner) > 0 {
		h(false)
		defer h(true) // after the writes, before pushMu is released
	}
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
// NOT_READY, and is asked again. A retry pushes only the subscriptions
// still held: one sent after an Unsubscribe would add it back at the owner.
// Callers hold subscriber.pushMu.
func (n *Node) pushSync(v *view, m Member, env *wire.Envelope, backoff time.Duration) {
	if n.life.ctx.Err() != nil || n.view() != v {
		return
	}
	n.rpc.sendEnvelope(m.Inbox, env, n.cfg.RequestTimeout, func(rep *wire.Reply, err error) {
		if err != nil || rep.GetCode() != wire.Reply_OK {
			next := min(2*backoff, time.Second)
			time.AfterFunc(backoff, func() {
				n.subscriber.pushMu.Lock() // as in pushMoved
				defer n.subscriber.pushMu.Unlock()
				s := env.GetSync()
				held := n.subscriber.stillHeld(s.GetTopics())
				if len(held) == 0 {
					return // all unsubscribed meanwhile
				}
				retry := &wire.Sync{From: s.GetFrom(), ViewId: s.GetViewId(), Topics: held}
				n.pushSync(v, m, &wire.Envelope{Body: &wire.Envelope_Sync{Sync: retry}}, next)
			})
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
	n.stats.syncRequests.Add(1)
	owner := req.GetFrom().GetNodeId()
	v := viewOf(req.GetMembers())
	if owner == "" || v == nil || len(req.GetMembers()) > n.cfg.MaxMembers {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid sync request"})
		return
	}
	if req.GetHandover() {
		n.serveHandover(v, owner, reply)
		return
	}
	if !v.holds(n.self) {
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
	n.subscriber.eachOwnedBy(v, owner, func(topic, local string) {
		out = append(out, [2]string{topic, local})
	})
	slices.SortFunc(out, compareEntries)
	return out
}

// viewOf builds the view a requester named; nil when the list is invalid.
func viewOf(refs []*wire.MemberRef) *view {
	members := make([]Member, 0, len(refs))
	for _, r := range refs {
		if r.GetNodeId() == "" {
			return nil
		}
		members = append(members, Member{ID: r.GetNodeId(), Incarnation: r.GetIncarnation(), ClientOnly: r.GetClientOnly()})
	}
	return newView(0, members)
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
		if slices.ContainsFunc(locals, func(l string) bool { return len(l) > maxLocalIDLen }) {
			n.malformed("inbox", len(t.GetTopic()))
			continue
		}
		n.owner.onActor(t.GetTopic(), false, func(a *topicActor) {
			for _, l := range locals {
				a.subscribe(from, l, false, func(ownerAnswer) {})
			}
		})
	}
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK, ViewId: v.id})
}

// pullHandover asks leaver, draining after its LEAVE, for its state as owner
// of the topics this node gains from it. A leaver that cannot give it (gone,
// not ready for one of those topics, too much for one message) makes every
// member be asked instead.
func (r *syncRegistry) pullHandover(ctx context.Context, v *view, leaver Member) {
	n := r.n
	req := &wire.SyncRequest{From: n.selfRef(), ViewId: v.id, Members: v.refs(), Handover: true}
	env := &wire.Envelope{Body: &wire.Envelope_SyncRequest{SyncRequest: req}}
	rep, err := n.rpc.callEnvelope(ctx, leaver.Inbox, env, callOpts{timeout: n.cfg.RequestTimeout / 2})
	if ctx.Err() != nil {
		return
	}
	page := rep.GetSync()
	if err != nil || rep.GetCode() != wire.Reply_OK || page == nil || page.GetIncomplete() ||
		page.GetFrom().GetNodeId() != leaver.ID || page.GetFrom().GetIncarnation() != leaver.Incarnation {
		n.log.Debug("no handover: asking every member", "leaver", leaver.ID, "err", err, "code", rep.GetCode(), "incomplete", page.GetIncomplete())
		r.fallBack(v)
		return
	}
	r.applyHandover(v, leaver.ID, page.GetTopics())
}
