package pubsub

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// membership is the node's view of the live members: heartbeats in and out,
// the peers heard from, the recent views, the partition quorum. mu guards
// peers, rejectedSince, views.history and quorum.stable; views.cur is read
// lock-free.
type membership struct {
	mu            sync.Mutex
	peers         map[string]*peer
	rejectedSince uint64         // heartbeats ignored past MaxMembers since the last event
	views         installedViews // the current and recent views (view_history.go)
	control       serial         // runs view changes in order
	pushed        *view          // the last view whose moved subscriptions were pushed; control actor only
	subject       string         // <prefix>.members
	sub           *nats.Subscription
	joined        atomic.Bool               // Join returned: the view is stable enough to serve topics
	quorum        quorum                    // the stable views (every policy; KeepMajority acts on them)
	left          map[incarnation]time.Time // members that left gracefully, recently: when last heard leaving
	beatNow       chan struct{}             // the view changed: heartbeat early
	// peerPayload is the smallest max_payload the peers that may own
	// topics advertise (0: none known), for MaxMessageSize. Set under mu
	// when the peers change (ownerPayload), read lock-free on every
	// publish.
	peerPayload atomic.Int64
	// sameID: other live incarnations of this node's ID, and of its
	// peers' (replaced.go).
	sameID sameIDWatch
}

// earlyBeatSpacing bounds the heartbeats a burst of view changes triggers.
const earlyBeatSpacing = 20 * time.Millisecond

// incarnation names one life of a member. Graceful leaves are remembered
// per incarnation: their heartbeats, arriving late, must not re-add the
// node, the owners it leaves topics to ask it for a handover, and its
// publishers wait for it while it drains. Keyed by ID alone, a new
// incarnation's LEAVE (a failed restart under the ID, or a forgery)
// replaced a draining one's, whose publishers then gave up on it.
type incarnation struct {
	id  string
	inc uint64
}

// bury records m's graceful leave, forgetting the oldest one past limit,
// and reports whether it forgot one. Callers hold mu.
func (m *membership) bury(leaver Member, limit int) (forgot bool) {
	if len(m.left) >= limit {
		var oldest incarnation
		var at time.Time
		for k, t := range m.left {
			if at.IsZero() || t.Before(at) {
				oldest, at = k, t
			}
		}
		delete(m.left, oldest)
		forgot = true
	}
	m.left[incarnation{leaver.ID, leaver.Incarnation}] = time.Now()
	return forgot
}

// stillLeaving records a repeated LEAVE of incarnation inc of id, which
// left gracefully within ttl and is still draining, and reports whether it
// was one. Callers hold mu.
func (m *membership) stillLeaving(id string, inc uint64, ttl time.Duration) bool {
	if !m.buried(id, inc, ttl) {
		return false
	}
	m.left[incarnation{id, inc}] = time.Now()
	return true
}

// buried reports whether incarnation inc of id left, or repeated its LEAVE
// while draining, within ttl. Callers hold mu.
func (m *membership) buried(id string, inc uint64, ttl time.Duration) bool {
	k := incarnation{id, inc}
	at, ok := m.left[k]
	if ok && time.Since(at) > ttl {
		delete(m.left, k)
		return false
	}
	return ok
}

// changeBetween says what the registry must ask about for the move from
// prev to next. Callers hold mu.
func (m *membership) changeBetween(prev, next *view, self string) viewChange {
	var c viewChange
	for _, p := range prev.members {
		if p.ID == self || next.holds(p) {
			continue
		}
		if _, ok := m.left[incarnation{p.ID, p.Incarnation}]; ok {
			c.leavers = append(c.leavers, p)
		} else {
			c.lost = true
		}
	}
	return c
}

func (m *membership) init(n *Node) {
	m.peers = make(map[string]*peer)
	m.left = make(map[incarnation]time.Time)
	m.sameID.timedOut = make(map[string]uint64)
	m.views.viewed = make(chan struct{})
	m.beatNow = make(chan struct{}, 1)
	m.subject = natsutil.MembersSubject(n.cfg.Prefix)
	m.control.goroutines = &n.life.goroutines
	// Epochs start at 1: view.returned names the epoch before a return,
	// and 0 there means none. A return right after the first view (a node
	// that joined alone, then heard peers that ran without it) was taken
	// for none, and its topics served without the peers' subscribers.
	first := newView(1, []Member{n.self})
	m.views.cur.Store(first)
	m.views.history.remember(first)
	m.pushed = first
}

func (m *membership) view() *view { return m.views.cur.Load() }

// peer is what this node knows of another member.
type peer struct {
	m        Member
	lastSeen time.Time
	viewID   uint64 // the peer's view as last reported
	// maxPayload is the max_payload of the peer's server as its heartbeats
	// last said (0: not said, a member from before MemberRef.max_payload).
	maxPayload uint64
	// disagreeSince is when viewID and this node's view last started to
	// differ (zero while they agree); a change on either side that leaves
	// them apart does not restart it. Under KeepMajority a peer that
	// disagrees for longer than viewDisagreementGrace does not count.
	disagreeSince time.Time
	// settings: what its heartbeats last said of the settings members must
	// agree on (peer_settings.go).
	settings peerSettings
	// toldStale: when an older incarnation of its ID, still running, was
	// last told that this one replaced it (replaced.go).
	toldStale time.Time
	// beating: a HEARTBEAT of its own was heard, not only a JOIN reply or
	// a listing. A joiner counts only such members' refusals (joinRefusals):
	// anyone may answer a JOIN.
	beating bool
	// The peer's stable view as last reported (any policy); stable
	// and stablePrev hold the members the heartbeat listed, if any.
	stableEpoch, stableID uint64
	stableConfirmed       bool
	stable, stablePrev    *view
}

// noteAgreement starts or ends p's disagreement with this node's view cur.
func (p *peer) noteAgreement(cur uint64, now time.Time) {
	switch {
	case p.viewID == cur:
		p.disagreeSince = time.Time{}
	case p.disagreeSince.IsZero():
		p.disagreeSince = now
	}
}

// Members returns the current view, sorted by ID, including this node.
func (n *Node) Members() []Member {
	return slices.Clone(n.view().members)
}

// WaitMembers waits until this node's view holds at least count members,
// itself included (as Members counts them), and returns nil. Join returns
// once the view is stable, whatever its size; a service that needs its
// peers before it starts waits here. It returns an error wrapping ctx's
// if ctx ends first, one wrapping ErrClosed once Close was called or the
// node stopped, and ErrInvalidConfig for a count below 1.
func (n *Node) WaitMembers(ctx context.Context, count int) error {
	if count < 1 {
		return fmt.Errorf("%w: WaitMembers(%d): want at least 1 member", ErrInvalidConfig, count)
	}
	for {
		n.members.mu.Lock()
		have, changed := len(n.view().members), n.members.views.viewed
		n.members.mu.Unlock()
		switch {
		case have >= count:
			return nil
		case n.life.closed.Load() || n.life.closeCalled.Load():
			return fmt.Errorf("pubsub: WaitMembers: node %s: %w", n.self.ID, ErrClosed)
		}
		select {
		case <-changed:
		case <-n.life.ctx.Done(): // stopped: the loop returns ErrClosed
		case <-ctx.Done():
			return fmt.Errorf("pubsub: WaitMembers: %d of %d members in node %s's view: %w", have, count, n.self.ID, ctx.Err())
		}
	}
}

// OwnerOf returns the member that owns topic in this node's current view.
// It asks no one and never blocks. An invalid topic fails with
// ErrInvalidTopic; in a view of client-only members (WithClientOnly) no
// member owns topics: it fails with ErrTopicUnavailable.
func (n *Node) OwnerOf(topic string) (Member, error) {
	if err := validateTopic(topic); err != nil {
		return Member{}, err
	}
	owner := n.view().ownerOf(topic)
	if owner.ID == "" {
		return Member{}, fmt.Errorf("%w: no member may own %q: every member of the view is client-only", ErrTopicUnavailable, topic)
	}
	return owner, nil
}

func (n *Node) view() *view { return n.members.view() }

func (n *Node) selfRef() *wire.MemberRef {
	return n.self.ref()
}

// ownerPayload recomputes members.peerPayload: the smallest max_payload
// advertised by a peer that may own topics. An owner forwards a publish to
// the other nodes on its own connection, whose server refuses a payload
// over its max_payload: a publisher on a server with a larger one must keep
// its messages within the owners' limit, or the owner would accept what it
// cannot forward. Client-only peers own nothing; a peer that said no limit
// (0) is not counted. Callers hold members.mu.
func (n *Node) ownerPayload() {
	var least uint64
	for _, p := range n.members.peers {
		if !p.m.ClientOnly && p.maxPayload > 0 && (least == 0 || p.maxPayload < least) {
			least = p.maxPayload
		}
	}
	n.members.peerPayload.Store(int64(min(least, math.MaxInt32)))
}

// recomputeView installs a new view if the peer set changed. Callers hold members.mu,
// so views are installed, and their handoff queued, in order.
func (n *Node) recomputeView() {
	members := make([]Member, 0, len(n.members.peers)+1)
	members = append(members, n.self)
	for _, p := range n.members.peers {
		members = append(members, p.m)
	}
	n.ownerPayload()
	prev := n.view()
	next := newView(prev.epoch+1, members)
	ranApart := n.members.views.ranApart
	n.members.views.ranApart = false
	if next.id == prev.id {
		return
	}
	// Carried forward: an actor asleep since before a return still waits.
	next.returned = max(prev.returned, n.members.views.history.returnedBefore(next, n.self.ID))
	if ranApart {
		// The history names only members it still remembers, in their
		// incarnation: not one restarted or started on the other side of a
		// partition, nor one whose earlier views were trimmed.
		next.returned = prev.epoch
	}
	n.members.views.cur.Store(next)
	close(n.members.views.viewed)
	n.members.views.viewed = make(chan struct{})
	now := time.Now()
	for _, p := range n.members.peers {
		p.noteAgreement(next.id, now)
	}
	n.members.views.history.remember(next)
	since := n.owner.registry.stamp() // taken before the snapshot of this node's own subscriptions
	n.owner.registry.reset(next, n.subscriber.ownedBy(next, n.self.ID), since, n.members.changeBetween(prev, next, n.self.ID))
	n.updateQuorum(false)
	select {
	case n.members.beatNow <- struct{}{}:
	default:
	}
	n.members.control.do(func() { n.viewChanged(prev, next) })
}

// ownedThroughout reports whether this node owned topic in every view with
// an epoch in (from, to].
func (n *Node) ownedThroughout(topic string, from, to uint64) bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.members.views.history.ownedThroughout(n.self.ID, topic, from, to)
}

// viewAt returns the recent view with the given epoch, or nil.
func (n *Node) viewAt(epoch uint64) *view {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.members.views.history.at(epoch)
}

// onMembers handles a message on <prefix>.members. Malformed messages are
// dropped: anyone can publish there.
func (n *Node) onMembers(m *nats.Msg) {
	var env wire.Envelope
	if proto.Unmarshal(m.Data, &env) != nil {
		n.malformed("members", len(m.Data))
		return
	}
	hb := env.GetHeartbeat()
	from := hb.GetFrom()
	if hb == nil || natsutil.ValidateNodeID(from.GetNodeId()) != nil {
		n.malformed("members", len(m.Data))
		return
	}
	if from.GetNodeId() == n.self.ID {
		n.heardSameID(hb)
		return
	}
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	if n.life.closed.Load() || n.life.closeCalled.Load() {
		// Leaving: a JOIN answered now would re-add this node on the joiner.
		// Its LEAVE tells the joiner someone heard it, so one that found
		// this node's subscription on the members subject does not wait
		// out MemberTimeout for an answer (joinView). Peers leaving too
		// need no handover from it.
		if hb.GetKind() == wire.Heartbeat_JOIN && m.Reply != "" {
			n.publishEnvelope(m.Reply, &wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
				Kind: wire.Heartbeat_LEAVE, From: n.selfRef()}}})
		}
		if hb.GetKind() == wire.Heartbeat_LEAVE {
			if _, ok := n.view().member(from.GetNodeId()); ok { // bounded by the view: a forged LEAVE adds nothing
				n.life.drain.markLeft(from.GetNodeId())
			}
		}
		return
	}
	if hb.GetKind() == wire.Heartbeat_LEAVE {
		id, inc := from.GetNodeId(), from.GetIncarnation()
		if p, ok := n.members.peers[id]; ok && p.m.Incarnation == inc {
			if n.members.bury(p.m, n.cfg.MaxMembers) {
				n.forgotMember("a graceful leave", id)
			}
			delete(n.members.peers, id)
			n.forgetLeaver(id, hb)
			n.peersChangedLocked()
		} else if !n.members.stillLeaving(id, inc, n.cfg.MemberTimeout) {
			return
		}
		// A leaver repeats its LEAVE while it drains, and its publishers
		// keep waiting for its answers until MemberTimeout after the last
		// one (ownerAnswers): if it dies meanwhile, they must not wait out
		// RequestTimeout.
		n.rpc.sweepUntil(time.Now().Add(n.cfg.MemberTimeout+n.cfg.HeartbeatInterval), n.cfg.HeartbeatInterval)
		return
	}
	n.heard(hb)
	if hb.GetKind() == wire.Heartbeat_JOIN && m.Reply != "" {
		n.answerJoin(from, m.Reply)
	}
}

// heard records a heartbeat of a live member: a sign of life, its view, its
// stable view. Callers hold members.mu.
func (n *Node) heard(hb *wire.Heartbeat) {
	from := hb.GetFrom()
	n.seen(from, hb.GetViewId(), hb.GetKind() == wire.Heartbeat_JOIN)
	if p := n.members.peers[from.GetNodeId()]; p != nil && p.m.Incarnation == from.GetIncarnation() {
		p.beating = p.beating || hb.GetKind() == wire.Heartbeat_HEARTBEAT
		n.noteStable(p, hb)
		if n.members.sameID.superseded.Load() {
			n.noteReplacedView(p)
		}
	}
}

// seen records a sign of life of ref; callers hold members.mu. joining:
// the sign is ref's JOIN, so a new member did not run without this node.
func (n *Node) seen(ref *wire.MemberRef, viewID uint64, joining bool) {
	id := ref.GetNodeId()
	p, ok := n.members.peers[id]
	if n.members.buried(id, ref.GetIncarnation(), n.cfg.MemberTimeout) {
		return // a heartbeat of a node that left, arriving late
	}
	if ok && p.m.Incarnation != ref.GetIncarnation() {
		if ref.GetIncarnation() < p.m.Incarnation {
			// A stale message of an older incarnation. It still runs: if
			// this node dropped it for silence, it was cut off and replaced.
			if n.members.sameID.timedOut[id] == ref.GetIncarnation() {
				n.tellStale(p, ref)
			}
			return
		}
		if time.Since(p.lastSeen) < 2*n.cfg.HeartbeatInterval {
			// The older incarnation is alive: a second node joining with
			// its ID (which will fail and leave), not a restart. Replacing
			// it would drop a live node's subscriptions until then.
			return
		}
		ok = false // the node restarted: its old subscriptions are gone
	}
	if !ok {
		if _, known := n.members.peers[id]; !known && n.viewFullLocked() {
			n.rejectMember(id)
			return
		}
		p = &peer{m: Member{ID: id, Incarnation: ref.GetIncarnation(), Inbox: natsutil.NodeSubject(n.cfg.Prefix, id), ClientOnly: ref.GetClientOnly()}, maxPayload: ref.GetMaxPayload()}
		n.members.peers[id] = p
		if n.members.sameID.timedOut[id] == ref.GetIncarnation() {
			// Taken back: it was not replaced while away. Kept, the entry
			// would have a newer incarnation joining at once with it
			// later (which fails) tell this live one it was replaced.
			delete(n.members.sameID.timedOut, id)
		}
		if n.members.joined.Load() {
			n.members.views.ranApart = !joining
			n.recomputeView()
		} else {
			// Joining: members answer one by one, and a view per answer
			// cost a handoff round each; joinView installs them together.
			n.members.views.viewPending = true
		}
	}
	p.lastSeen = time.Now()
	if viewID != 0 {
		p.viewID = viewID
	}
	n.checkSettings(p, ref)
	if mp := ref.GetMaxPayload(); mp != 0 && mp != p.maxPayload {
		// Said for the first time (the peer was listed by another), or
		// the peer reconnected to a server with another max_payload.
		p.maxPayload = mp
		n.ownerPayload()
	}
	p.noteAgreement(n.view().id, p.lastSeen)
}

// peersChangedLocked installs the view of the peers after one was
// dropped. While joining, joinView installs it instead, with the peers it
// added, as one view that counts them as returned (installPendingLocked):
// installed here, the view would not, and the next install, finding no
// change, would drop the mark. Callers hold members.mu.
func (n *Node) peersChangedLocked() {
	if n.members.joined.Load() {
		n.recomputeView()
		return
	}
	n.members.views.viewPending = true
}

// viewFullLocked reports whether the peers and this node fill MaxMembers:
// a new member is ignored (seen), and a joiner told so (answerJoin).
// Callers hold members.mu.
func (n *Node) viewFullLocked() bool {
	return len(n.members.peers)+1 >= n.cfg.MaxMembers
}

// forgotMember counts and logs (throttled) an entry of a bounded record
// about past members forgotten to stay within MaxMembers: what holds
// MaxMembers graceful leaves, or members timed out, at once has seen
// churn (or forgery) far past the view's size. Callers hold members.mu.
func (n *Node) forgotMember(what, id string) {
	n.stats.membersForgotten.Add(1)
	if ok, held := n.log.limit.allow("members/forgotten"); ok {
		n.log.Warn("forgot a past member's record to stay within MaxMembers", "record", what, "member", id, "limit", n.cfg.MaxMembers, "suppressed", held)
	}
}

// rejectMember counts, logs and reports (both throttled) a node ignored
// because the view is full. Callers hold members.mu.
func (n *Node) rejectMember(id string) {
	n.stats.membersRejected.Add(1)
	n.members.rejectedSince++
	if ok, held := n.log.limit.allow("members/limit"); ok {
		n.log.Warn("member ignored: the view holds MaxMembers members", "member", id, "limit", n.cfg.MaxMembers, "suppressed", held)
		emit(n.events, MemberRejected{Member: id, Members: len(n.members.peers) + 1, Limit: n.cfg.MaxMembers, Rejected: n.members.rejectedSince})
		n.members.rejectedSince = 0
	}
}
