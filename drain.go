package pubsub

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A graceful leave drains. Close stops the heartbeats, stops taking
// requests (answering CLOSED, so requesters retry with the new owner at
// once), announces the LEAVE, answers the batches it accepted as owner and
// the requests that passed the drain check just before it began (their
// publishers keep waiting for a gracefully leaving owner), and serves each
// member that gains some of its topics a handover: its subscriber sets of
// those topics, so the new owners serve them without asking every member.
// Only then does it unsubscribe its inbox.

// drainState tracks a draining Close.
type drainState struct {
	on      atomic.Bool
	mu      sync.Mutex
	served  map[string]bool // members that took their handover
	left    map[string]bool // members that left meanwhile and need none
	queued  []handoverJob   // requests waiting for a server, one per member at most
	serving int             // goroutines serving handovers, at most maxSyncPullers
	owners  []*topicOwners  // per view requesters named, at most maxOwnerViews
}

// topicOwners is which of this node's topics each member owns under one
// view. Every member's handover needs it for the view it names, which is
// usually the same for all of them (the view without this node): computed
// once per view, a leave costs one rendezvous per topic, not one per topic
// per member.
type topicOwners struct {
	v    *view
	gen  uint64 // the registry's generation when listed (syncRegistry.gen)
	once sync.Once
	by   map[string][]string // member ID -> topics
}

// maxOwnerViews bounds the views whose topic owners are kept; requests
// naming other views (forged, or from members that saw other changes) get
// theirs computed for them alone.
const maxOwnerViews = 4

// ownersUnder returns the topic owners under v, computing them once per
// view (views compared by their members, not by their hash: a forger
// could match a hash) and registry generation gen: a view change or a
// resync while draining can add topics pending in the registry.
func (d *drainState) ownersUnder(v *view, gen uint64, topics func() []string) map[string][]string {
	d.mu.Lock()
	i := slices.IndexFunc(d.owners, func(o *topicOwners) bool { return slices.Equal(o.v.members, v.members) })
	var o *topicOwners
	switch {
	case i >= 0 && d.owners[i].gen == gen:
		o = d.owners[i]
	case i >= 0:
		o = &topicOwners{v: v, gen: gen}
		d.owners[i] = o
	default:
		o = &topicOwners{v: v, gen: gen}
		if len(d.owners) < maxOwnerViews {
			d.owners = append(d.owners, o)
		}
	}
	d.mu.Unlock()
	o.once.Do(func() {
		o.by = map[string][]string{}
		for _, t := range topics() {
			id := v.ownerOf(t).ID
			o.by[id] = append(o.by[id], t)
		}
	})
	return o.by
}

// handoverJob is what one member asked for its handover while its request
// waited for a server. Every copy that waits is answered: a copy can be a
// retry, or a forgery naming the member, and answering only the first let
// a forged request sent just before the member's own one take its place.
// (A forged copy served alone still counts the member as served, so the
// leaver may go before the member's own request is served; the member then
// asks every member, slower but never wrong.)
type handoverJob struct {
	requester string
	asks      []handoverAsk // at most maxHandoverAsks, the newest
}

type handoverAsk struct {
	v     *view // the requester's view, as the request named it
	reply string
}

// maxHandoverAsks bounds the copies of one member's request that wait;
// past it the oldest copy is answered incomplete (its requester asks every
// member) and the newest, which a retrying member waits for, is kept.
const maxHandoverAsks = 4

func (d *drainState) start() {
	d.mu.Lock()
	d.served, d.left, d.owners = map[string]bool{}, map[string]bool{}, nil
	d.mu.Unlock()
	d.on.Store(true)
}

// enqueue queues requester's ask, and reports whether the caller must
// start a server for it (fewer than maxSyncPullers run), and the reply
// subject of a copy it pushed out to stay within maxHandoverAsks ("" if
// none). queued is bounded by the view, each job by maxHandoverAsks.
func (d *drainState) enqueue(requester string, a handoverAsk) (start bool, dropped string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.queued {
		if j := &d.queued[i]; j.requester == requester {
			if len(j.asks) >= maxHandoverAsks {
				dropped = j.asks[0].reply
				j.asks = append(j.asks[:0], j.asks[1:]...)
			}
			j.asks = append(j.asks, a)
			return false, dropped
		}
	}
	d.queued = append(d.queued, handoverJob{requester: requester, asks: []handoverAsk{a}})
	if d.serving < maxSyncPullers {
		d.serving++
		return true, ""
	}
	return false, ""
}

// next takes the next queued request; when none is left the calling server
// stops.
func (d *drainState) next() (handoverJob, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.queued) == 0 {
		d.serving--
		return handoverJob{}, false
	}
	j := d.queued[0]
	d.queued = d.queued[1:]
	return j, true
}

func (d *drainState) markServed(id string) { d.mark(func() { d.served[id] = true }) }
func (d *drainState) markLeft(id string)   { d.mark(func() { d.left[id] = true }) }

func (d *drainState) mark(f func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.served != nil {
		f()
	}
}

// settled reports whether every member of v but self took its handover or
// left.
func (d *drainState) settled(v *view, self string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range v.members {
		if m.ID != self && !d.served[m.ID] && !d.left[m.ID] {
			return false
		}
	}
	return true
}

// drainAndLeave is the graceful part of Close; it returns within ctx and at
// most SubscriberTimeout + RequestTimeout plus the handover window
// (max(handoverWindow, 2 x HeartbeatInterval)), with ctx's error if ctx cut the
// drain short (not when the answers or the handovers ran out of time: those
// are the drain's own bounds).
func (n *Node) drainAndLeave(ctx context.Context) error {
	n.life.drain.start()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	// The LEAVE goes first, so peers re-own this node's topics at once
	// (new requests are answered CLOSED meanwhile, and retried). Then the
	// batches accepted as owner are answered and the requests that got
	// past the inbox's drain check just before it began are served: their
	// publishers keep waiting for an owner that left gracefully
	// (ownerAnswers). The LEAVE names the stable view this node hands on
	// (handOver), whatever its policy.
	n.members.mu.Lock()
	n.handOver()
	n.members.mu.Unlock()
	n.sendHeartbeat(wire.Heartbeat_LEAVE, "")
	fctx, cancel := context.WithTimeout(ctx, time.Second)
	_ = n.nc.FlushWithContext(fctx)
	cancel()
	// The LEAVE repeats every heartbeat interval while the node drains:
	// publishers waiting for its answers give up MemberTimeout after the
	// last one they heard (ownerAnswers), so a leaver that dies draining
	// is not waited for until RequestTimeout.
	lastLeave := time.Now()
	repeatLeave := func() {
		if time.Since(lastLeave) >= n.cfg.HeartbeatInterval {
			n.sendHeartbeat(wire.Heartbeat_LEAVE, "")
			lastLeave = time.Now()
		}
	}
	answered := time.Now().Add(n.cfg.SubscriberTimeout + n.cfg.RequestTimeout)
	for (n.owner.queued.Load() > 0 || n.owner.inflight.Load() > 0) && time.Now().Before(answered) {
		if n.nc.IsClosed() { // closed underneath: nothing can be answered any more
			return nil
		}
		repeatLeave()
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	v := n.view()
	// Peers ask for their handover as soon as they see the LEAVE. One that
	// has not asked within the window (crashed, partitioned, slow) asks
	// every member instead: slower for it, never wrong.
	window := time.Now().Add(max(handoverWindow, 2*n.cfg.HeartbeatInterval))
	for !n.life.drain.settled(v, n.self.ID) && !n.nc.IsClosed() {
		if time.Now().After(window) {
			n.log.Info("leaving before every member took its handover", "members", len(v.members))
			return nil
		}
		repeatLeave()
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// handoverWindow is the least time a leaving node waits for its peers to
// take their handovers.
const handoverWindow = 250 * time.Millisecond

// onInboxDraining answers a request that reaches a draining node.
func (n *Node) onInboxDraining(env *wire.Envelope, reply string) {
	switch b := env.Body.(type) {
	case *wire.Envelope_SyncRequest:
		if b.SyncRequest.GetHandover() {
			n.onSyncRequest(b.SyncRequest, reply)
			return
		}
	case *wire.Envelope_Evict:
		n.onEvict(b.Evict, reply)
		return
	case *wire.Envelope_Topics:
		n.onTopicsRequest(b.Topics, reply) // read-only: its subscriptions still count
		return
	}
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_CLOSED})
}

// serveHandover answers requester, which owns under v some of the topics
// this draining node owned, with its subscriber sets of those topics. A node
// that is not draining, or was not ready for one of them, answers
// incomplete: the requester then asks every member.
func (n *Node) serveHandover(v *view, requester, reply string) {
	incomplete := func() {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_OK, Sync: &wire.Sync{From: n.selfRef(), Incomplete: true}})
	}
	if !n.life.drain.on.Load() {
		incomplete()
		return
	}
	if _, member := n.view().member(requester); !member {
		incomplete() // not a peer this node leaves topics to (or forged)
		return
	}
	// At most maxSyncPullers servers build handovers at once, and the
	// other members' requests wait for one: refusing them (answering
	// incomplete) made each ask every member instead, and kept this node
	// waiting for them until the handover window closed.
	start, dropped := n.life.drain.enqueue(requester, handoverAsk{v: v, reply: reply})
	if dropped != "" {
		n.replyTo(dropped, &wire.Reply{Code: wire.Reply_OK, Sync: &wire.Sync{From: n.selfRef(), Incomplete: true}})
	}
	if start {
		n.life.goroutines.add()
		go n.serveHandovers()
	}
}

// serveHandovers serves queued handover requests until none is left. The
// copies of one member's request share a page when they named the same
// members (compared in full: a view ID is a hash a forger could match).
func (n *Node) serveHandovers() {
	defer n.life.goroutines.done()
	for {
		j, ok := n.life.drain.next()
		if !ok {
			return
		}
		type built struct {
			v    *view
			page *wire.Sync
		}
		var pages []built
		for _, a := range j.asks {
			i := slices.IndexFunc(pages, func(b built) bool { return slices.Equal(b.v.members, a.v.members) })
			if i < 0 {
				pages = append(pages, built{a.v, n.handoverFor(a.v, j.requester)})
				i = len(pages) - 1
			}
			n.replyTo(a.reply, &wire.Reply{Code: wire.Reply_OK, Sync: pages[i].page})
		}
		n.life.drain.markServed(j.requester)
	}
}

// handoverFor collects, from the topic actors, the subscriber sets of the
// topics requester owns under v (ownersUnder: computed once per view).
// While this node's own registry is not complete, a topic it gained may
// lack subscribers it was never told of: the page says it is incomplete,
// and the requester asks every member.
func (n *Node) handoverFor(v *view, requester string) *wire.Sync {
	complete, gen := n.owner.registry.completeGen()
	page := &wire.Sync{From: n.selfRef(), Incomplete: !complete}
	var mu sync.Mutex
	var wg sync.WaitGroup
	size, limit := 0, n.maxPayload()/2
	for _, t := range n.life.drain.ownersUnder(v, gen, n.handoverTopics)[requester] {
		wg.Add(1)
		n.owner.onActor(t, false, func(a *topicActor) {
			defer wg.Done()
			a.reconcile()
			mu.Lock()
			defer mu.Unlock()
			switch {
			case !a.owned:
				return // not this node's: nothing to hand over
			case !a.ready:
				page.Incomplete = true
				return
			}
			for node, ns := range a.nodes {
				if node == n.self.ID {
					continue // leaving with this node
				}
				locals := append([]string(nil), ns.locals()...)
				page.Topics = append(page.Topics, &wire.TopicSubscribers{Topic: t, Node: node, Subscribers: locals})
				size += len(t) + len(node) + 8 + 4*len(locals)
				for _, l := range locals {
					size += len(l)
				}
			}
		})
	}
	wg.Wait()
	if size > limit {
		page.Topics, page.Incomplete = nil, true
	}
	return page
}

// handoverTopics lists the topics a handover covers: those with an actor,
// and those whose synced subscribers no actor took yet (a topic gained
// that no request named since: its actor is made to take them).
func (n *Node) handoverTopics() []string {
	names := n.owner.names()
	pending := n.owner.registry.topicsPending()
	if len(pending) == 0 {
		return names
	}
	have := make(map[string]struct{}, len(names))
	for _, t := range names {
		have[t] = struct{}{}
	}
	for _, t := range pending {
		if _, ok := have[t]; !ok {
			names = append(names, t)
		}
	}
	return names
}
