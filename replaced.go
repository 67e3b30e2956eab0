package pubsub

import (
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A node replaced under its ID. A node cut off from its peers for longer
// than MemberTimeout is dropped, and a new node may join with its ID (a
// restarted pod, say) while the old one still runs on the far side of the
// cut. Peers keep the newer incarnation and ignore the older one's
// heartbeats as stale, so after the heal the older node would carry on as a
// zombie: serving topics nobody routes to it, its subscriptions known to no
// owner, never told. Peers therefore answer a stale heartbeat with a notice
// on the older node's inbox, and a node that learns this way that it was
// replaced stops, as it does when its connection is closed (NodeStopped).
//
// The notice is a JOIN_REPLY heartbeat listing the newer incarnation. The
// replacement gets a copy too (the inbox subject is the ID's) and ignores
// it. Both sides check it:
//   - a peer tells only an incarnation it dropped itself for silence
//     (membership.sameID.timedOut), not one it replaced because a newer one
//     joined while the older was briefly quiet: of two nodes joining with
//     one ID at once the older wins, and it must not be stopped too;
//   - the older node believes a notice only when it heard the newer
//     incarnation itself (membership.sameID.superseded) and the peer's last
//     heartbeat reported the view this node has, with the newer
//     incarnation in its own place: the peer really serves that one, and a
//     notice forged in a live peer's name, whose heartbeats say otherwise,
//     stops nothing.
// This holds whichever way the cut went, also when only the older node's
// sends were cut and it never dropped its peers.

// A replacement the peers adopted while this node was only briefly quiet
// (a GC pause, a stalled connection: 2 heartbeat intervals, well short of
// MemberTimeout) is never told: a peer tells only an incarnation it timed
// out. The node ran on with subscriptions no owner routed to, silently,
// for as long as the newer one lived. So a node that heard a newer
// incarnation of its ID, and whose peers' heartbeats go on reporting its
// view with that incarnation in its place for MemberTimeout, while the
// newer one still beats, stops as if told: by then a newer node that lost
// the race on the ID (of two joining at once the older wins) has failed
// its Join and left, which clears superseded, and a newer one that fell
// silent (a single forged JOIN, a crash) is being dropped by the peers,
// which then take this node back and report its own view again. One of
// the two nodes ends, with an error saying why, and the cluster keeps the
// one its members serve.

// sameIDWatch is what membership tracks of other live incarnations of one
// ID: of this node's own (an older one: its Join fails; a newer one: it may
// have been replaced) and of its peers' (the ones it dropped for silence,
// told when a newer one replaced them). The atomics are read lock-free;
// timedOut and replacedView are guarded by membership.mu.
type sameIDWatch struct {
	idConflict   atomic.Bool   // an older live node with our ID was heard
	superseded   atomic.Bool   // a newer incarnation of our ID was heard and has not left (see onDeliver)
	supersededBy atomic.Uint64 // the last such incarnation heard
	supersededCO atomic.Bool   // whether that one is client-only (it may differ from this node)
	supersededAt atomic.Int64  // when a newer incarnation was last heard (unix ns)
	// timedOut holds, per ID, the incarnation this node last dropped for
	// silence (MemberTimeout) and has not taken back since, at most
	// MaxMembers of them: only those are told that a newer one replaced
	// them (replaced.go). Guarded by mu.
	timedOut map[string]uint64
	// replacedView: since when, and by whose heartbeat, the peers report
	// this node's view with a newer incarnation in its place (replaced.go:
	// noteReplacedView). Guarded by mu.
	replacedView struct {
		since time.Time
		by    string
	}
}

// heardSameID handles a heartbeat of this node's ID on <prefix>.members:
// another live node's, or this node's own. Callers do not hold members.mu.
func (n *Node) heardSameID(hb *wire.Heartbeat) {
	from := hb.GetFrom()
	// Two live nodes with one ID: the older incarnation wins, so of two
	// nodes joining at once exactly one fails, and a running node is
	// never pushed out by a newcomer.
	inc := from.GetIncarnation()
	if hb.GetKind() == wire.Heartbeat_LEAVE && inc > n.self.Incarnation && inc == n.members.sameID.supersededBy.Load() {
		// The newer one left (a Join that lost to this node, failing
		// on the ID conflict): this node is the only one again.
		n.members.sameID.superseded.Store(false)
	}
	if inc != n.self.Incarnation && hb.GetKind() != wire.Heartbeat_LEAVE {
		if inc < n.self.Incarnation {
			n.members.sameID.idConflict.Store(true)
		} else {
			// The last heard, not the newest: a third node with the ID
			// that failed on the conflict and left must not hide the
			// one that still beats, which the peers may serve
			// (noteReplacedView).
			n.members.sameID.supersededCO.Store(from.GetClientOnly())
			n.members.sameID.supersededBy.Store(inc)
			n.members.sameID.supersededAt.Store(time.Now().UnixNano())
			n.members.sameID.superseded.Store(true)
		}
		n.log.Warn("another live node uses this node's ID", "node", n.self.ID)
		if hb.GetKind() == wire.Heartbeat_JOIN && inc > n.self.Incarnation {
			n.sendHeartbeat(wire.Heartbeat_HEARTBEAT, "") // let the joiner see us at once
		}
	}
}

// meantForNewer reports whether a request or delivery that names the
// incarnation of this node's ID it was sent to (to_incarnation; 0 when the
// sender does not say) was meant for a newer one. Requests go to the ID's
// subject, which both incarnations hear after a heal until the older one
// stops: its answers would compete with the newer one's (a subscriber of
// the newer one reported gone, a publish served by both and delivered
// twice). The older stays silent; the newer answers.
func (n *Node) meantForNewer(to uint64) bool {
	return to > n.self.Incarnation
}

// toIncarnation returns the incarnation env names as its receiver: a
// delivery's, a publish's or a subscribe's to_incarnation; 0 for others.
func toIncarnation(env *wire.Envelope) uint64 {
	switch b := env.Body.(type) {
	case *wire.Envelope_Deliver:
		return b.Deliver.GetToIncarnation()
	case *wire.Envelope_Publish:
		return b.Publish.GetToIncarnation()
	case *wire.Envelope_Subscribe:
		return b.Subscribe.GetToIncarnation()
	}
	return 0
}

// noteReplacedView records what p's heartbeat says of this node, which
// heard a newer incarnation of its ID: replaced (p reports this node's view
// with the newer one in its place) or not (p reports this node's own
// view, or p said replaced first and now reports another view: the reports
// must run on for MemberTimeout). Callers hold members.mu.
func (n *Node) noteReplacedView(p *peer) {
	r := &n.members.sameID.replacedView
	switch p.viewID {
	case n.viewReplacedBy(n.newerSelf()):
		if r.since.IsZero() {
			r.since, r.by = time.Now(), p.m.ID
		}
	case n.view().id:
		r.since = time.Time{}
	default:
		// The peer that reported it replaced reports another view now
		// (it dropped the newer one and does not hear this node, say):
		// its old reports must not count towards a later newer one that
		// beats once.
		if p.m.ID == r.by {
			r.since = time.Time{}
		}
	}
}

// newerSelf names the newer incarnation of this node's ID heard last, with its
// own ClientOnly: a restart may change it, and the peers' view hashes it.
func (n *Node) newerSelf() *wire.MemberRef {
	return &wire.MemberRef{NodeId: n.self.ID, Incarnation: n.members.sameID.supersededBy.Load(), ClientOnly: n.members.sameID.supersededCO.Load()}
}

// replacedForGood reports whether the peers have reported this node
// replaced for MemberTimeout (noteReplacedView), with the peer that said so
// first and the newer incarnation. Callers hold members.mu.
func (n *Node) replacedForGood() (by string, newer uint64, ok bool) {
	r := &n.members.sameID.replacedView
	if !n.members.sameID.superseded.Load() {
		r.since = time.Time{}
	}
	// The newer one must still beat (as peers tell a live member: within 2
	// heartbeat intervals): one that crashed late in the wait is about to
	// be dropped by the peers, which then take this node back.
	heard := time.Since(time.Unix(0, n.members.sameID.supersededAt.Load()))
	if r.since.IsZero() || time.Since(r.since) <= n.cfg.MemberTimeout || heard >= 2*n.cfg.HeartbeatInterval {
		return "", 0, false
	}
	return r.by, n.members.sameID.supersededBy.Load(), true
}

// tellStale answers a stale heartbeat of ref, an older incarnation of p's
// node, with a notice to that node's inbox, at most once per heartbeat
// interval. Callers hold members.mu.
func (n *Node) tellStale(p *peer, ref *wire.MemberRef) {
	now := time.Now()
	if now.Sub(p.toldStale) < n.cfg.HeartbeatInterval {
		return
	}
	p.toldStale = now
	n.log.Debug("told an older incarnation that it was replaced", "node", p.m.ID, "incarnation", ref.GetIncarnation(), "newer", p.m.Incarnation)
	n.publishEnvelope(p.m.Inbox, &wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_JOIN_REPLY, From: n.selfRef(), Members: []*wire.MemberRef{p.m.ref()},
	}}})
}

// noteTimedOut records that dropped was dropped for silence, forgetting an
// arbitrary entry past limit (that incarnation is then not told it was
// replaced), and reports whether it forgot one. Callers hold
// membership.mu.
func (w *sameIDWatch) noteTimedOut(dropped Member, limit int) (forgot bool) {
	if _, ok := w.timedOut[dropped.ID]; !ok && len(w.timedOut) >= limit {
		for id := range w.timedOut {
			delete(w.timedOut, id)
			forgot = true
			break
		}
	}
	w.timedOut[dropped.ID] = dropped.Incarnation
	return forgot
}

// onReplacedNotice handles a notice on the inbox that a newer incarnation
// of this node's ID replaced it (see tellStale), and stops the node if the
// notice is credible.
func (n *Node) onReplacedNotice(hb *wire.Heartbeat) {
	if hb.GetKind() != wire.Heartbeat_JOIN_REPLY {
		n.malformed("inbox", 0)
		return
	}
	var newer *wire.MemberRef
	for _, r := range hb.GetMembers() {
		if r.GetNodeId() == n.self.ID && r.GetIncarnation() > n.self.Incarnation {
			newer = r
		}
	}
	if newer == nil {
		return // about this incarnation: the copy a replacement gets
	}
	from := hb.GetFrom()
	n.members.mu.Lock()
	p := n.members.peers[from.GetNodeId()]
	credible := p != nil && p.m.Incarnation == from.GetIncarnation() && n.members.sameID.superseded.Load() &&
		p.viewID == n.viewReplacedBy(newer)
	n.members.mu.Unlock()
	if !credible {
		n.log.Debug("ignored a notice that this node was replaced", "from", from.GetNodeId(), "newer", newer.GetIncarnation())
		return
	}
	n.replaced(from.GetNodeId(), newer.GetIncarnation())
}

// viewReplacedBy returns the ID of this node's view with newer in this
// node's place: the view a peer that serves newer reports once it agrees
// with this node on everything else.
func (n *Node) viewReplacedBy(newer *wire.MemberRef) uint64 {
	members := slices.Clone(n.view().members)
	for i, m := range members {
		if m.ID == n.self.ID {
			members[i] = Member{ID: m.ID, Incarnation: newer.GetIncarnation(), Inbox: m.Inbox, ClientOnly: newer.GetClientOnly()}
		}
	}
	return newView(0, members).id
}

// replaced stops a node whose peers serve a newer incarnation of its ID.
func (n *Node) replaced(by string, newer uint64) {
	if !n.life.closed.CompareAndSwap(false, true) {
		return
	}
	err := fmt.Errorf("pubsub: node %s stopped: while it was cut off or quiet, another node joined with its ID (incarnation %d, reported by %s) and its peers serve that one now; Join again with another ID if both must run: %w",
		n.self.ID, newer, by, ErrClosed)
	n.log.Error("replaced by a newer node with this ID: node stopped", "err", err)
	emit(n.events, NodeStopped{Err: err})
	n.shutdown(err)
}
