package pubsub

import (
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// PartitionPolicy says what a node does when a network partition hides part
// of the cluster from it.
type PartitionPolicy uint8

const (
	// KeepServing: each side of a partition serves every topic. Publishes
	// keep being accepted on both sides, each owner counting only the
	// subscribers it can see, until the partition heals. The default.
	KeepServing PartitionPolicy = iota
	// KeepMajority: a node that cannot see a strict majority of the last
	// stable view (on a tie, the half holding the lowest node ID wins) stops
	// serving as owner; publishes to the topics it owns are rejected with
	// ReasonTopicUnavailable until it sees a majority again. Losing half of
	// the nodes at once (a crash, not a graceful leave) stops the service.
	KeepMajority
)

// String implements fmt.Stringer.
func (p PartitionPolicy) String() string {
	return enumName(p, "PartitionPolicy", "keep-serving", "keep-majority")
}

// quorum tracks the last stable view and whether this node sees a majority
// of it. Every node tracks it and reports it in its heartbeats, whatever its
// policy; only a KeepMajority node acts on it (servesAsOwner, QuorumChanged).
// A KeepServing node that tracked nothing sent no stable views, and a
// KeepMajority node among KeepServing ones (a rolling change of the policy)
// lost its majority when one member of three crashed: it counted only
// members reporting its stable view.
//
// Stable views are agreed on, not adopted per node. Each has an epoch, and
// every heartbeat reports the sender's (epoch, view ID). A node counts a
// member towards its majority only while the member reports the same stable
// view (or, while it catches up, the one before). A node holding a newer
// stable view tells the others in its heartbeats, and they adopt it once a
// majority of its members report it. Counted per node instead, a node that
// missed a change (cut off while the others dropped it) counted them
// against its older, larger stable view after the heal, and a second
// partition right then let both sides count a majority.
//
// A change is not atomic: the members of the old stable view move to the
// new one one heartbeat apart, and a partition in between can leave some on
// the old one, where they may still count a majority. So until the change is
// confirmed (a majority of the old stable view reported moving past it,
// seen by this node or reported by a member that saw it), a node also needs
// a majority of the old view on its side, as a joint configuration does.
// A minority never makes its own view stable, so it cannot talk itself into
// a majority.
type quorum struct {
	stable    *view     // guarded by membership.mu, as is everything but the atomics
	epoch     uint64    // stable's place in the agreed sequence: 0 until the first agreement
	prev      *view     // the stable view of epoch-1, when this node held it
	confirmed bool      // no majority of prev can still hold it
	since     time.Time // when this node last changed its stable view
	has       atomic.Bool
	report    atomic.Pointer[stableReport] // what this node's heartbeats carry
	leave     atomic.Pointer[stableReport] // what its LEAVE hands on (handOver)
}

// startQuorum makes the view Join settled on this node's first stable view,
// at epoch 0, unless the members report a later one it can adopt. A fresh
// cluster counts at epoch 0 until its first agreement moves it to 1.
func (n *Node) startQuorum() {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	// Disagreements between views count (disagreesLong) from now on: a
	// joiner's view may still differ from the others' for a moment (a
	// member it learnt from their lists drops at each node's own sweep).
	now := time.Now()
	for _, p := range n.members.peers {
		if !p.disagreeSince.IsZero() {
			p.disagreeSince = now
		}
	}
	// Heard from a cluster past its first agreement, the join view is no
	// agreed view: only one adopted from the members makes this node count.
	established := false
	for _, p := range n.members.peers {
		established = established || p.stableEpoch > 0
	}
	n.members.quorum.setStable(0, n.view(), nil, !established)
	// A node joining a running cluster adopts its stable view from the
	// heartbeats heard while joining; QuorumChanged reports changes after.
	n.members.quorum.has.Store(n.evaluateQuorum(n.view(), false))
}

// updateQuorum re-evaluates the quorum. It adopts a newer stable view a
// majority of its members report, confirms the last change when it can,
// counts, and, when this node has a majority, the last change is confirmed
// and agree says every member reports the current view, makes the current
// view the next stable one. Callers hold members.mu.
func (n *Node) updateQuorum(agree bool) {
	q := &n.members.quorum
	if q.stable == nil {
		return
	}
	cur := n.view()
	has := n.evaluateQuorum(cur, agree)
	if q.has.Swap(has) == has || n.cfg.PartitionPolicy != KeepMajority {
		return // KeepServing serves either way: nothing to tell
	}
	n.log.Warn("partition policy: quorum changed", "has_quorum", has, "members", len(cur.members), "stable", len(q.stable.members), "epoch", q.epoch)
	emit(n.events, QuorumChanged{HasQuorum: has, Members: len(cur.members), Stable: len(q.stable.members)})
}

// evaluateQuorum is updateQuorum but for its report: it returns whether
// this node has a majority. Callers hold members.mu.
func (n *Node) evaluateQuorum(cur *view, agree bool) bool {
	q := &n.members.quorum
	n.adoptReported(cur)
	if !q.confirmed && q.prev != nil && majorityOf(q.prev, n.movedTo(q.epoch, q.stable.id)) {
		q.confirm()
	}
	has := n.seesMajority(cur) && (q.confirmed || q.prev != nil && majorityOf(q.prev, n.onThisSide(cur)))
	if has && q.confirmed && agree && (cur.id != q.stable.id || q.epoch == 0) && q.epoch+1 < maxStableEpoch {
		q.setStable(q.epoch+1, cur, q.stable, false)
		select { // tell the peers now: until they hear, they count this node as catching up
		case n.members.beatNow <- struct{}{}:
		default:
		}
	}
	return has
}

// reports returns whether a member of the current view reports the stable
// view (epoch, id); withSelf counts this node as reporting it.
func (n *Node) reports(epoch, id uint64, withSelf bool) func(Member) bool {
	cur := n.view()
	return func(m Member) bool {
		p, self := n.peerIn(cur, m.ID)
		if self {
			return withSelf
		}
		return p != nil && p.stableEpoch == epoch && p.stableID == id
	}
}

// peerIn returns the peer of member if cur holds it, and whether member is
// this node. Callers hold members.mu.
func (n *Node) peerIn(cur *view, member string) (p *peer, self bool) {
	if member == n.self.ID {
		return nil, true
	}
	if _, ok := cur.member(member); !ok {
		return nil, false
	}
	return n.members.peers[member], false
}

// movedTo returns whether a member moved to the stable view (epoch, id):
// it reports it, or the next one made from it, or left gracefully. A member
// reporting another view of that epoch or later, made on another line (the
// other side of a partition advanced from the same view), does not count:
// counted, it confirmed this node's change while that line still held a
// majority of its own.
func (n *Node) movedTo(epoch, id uint64) func(Member) bool {
	return func(m Member) bool {
		if m.ID == n.self.ID || n.members.buried(m.ID, m.Incarnation, n.cfg.MemberTimeout) {
			return true
		}
		p := n.members.peers[m.ID]
		switch {
		case p == nil:
			return false
		case p.stableEpoch == epoch && p.stableID == id:
			return true
		default:
			return p.stableEpoch == epoch+1 && p.stablePrev != nil && p.stablePrev.id == id
		}
	}
}

// onThisSide returns whether a member is in cur or left gracefully: not
// where another side could count it.
func (n *Node) onThisSide(cur *view) func(Member) bool {
	return func(m Member) bool {
		_, ok := cur.member(m.ID)
		return ok || n.members.buried(m.ID, m.Incarnation, n.cfg.MemberTimeout)
	}
}

// seesMajority reports whether the members of cur that hold this node's
// stable view are a majority of it. A member holds it when it reports it;
// while the current view holds every member of the stable one, also when it
// reports the stable view before (it has not heard of the change yet) or an
// older one while its current view is this one (it will make it stable at
// its next tick). Members that joined since do not change that: only the
// stable view's members count. Until the first agreement (epoch 0), with
// no member past it, members reporting this node's current view count.
// Callers hold members.mu.
func (n *Node) seesMajority(cur *view) bool {
	q := &n.members.quorum
	// Counted only with all of the stable view in sight: it was "the
	// current view is the stable view", and a join within milliseconds of a
	// graceful leave then cost every member its majority until the peers'
	// next heartbeats (TestKeepMajorityGracefulLeaveRightAfterAJoin...).
	catchingUp := cur.holdsAll(q.stable)
	bootstrap := q.epoch == 0
	if bootstrap {
		for _, p := range n.members.peers {
			if p.stableEpoch > 0 {
				bootstrap = false
				break
			}
		}
	}
	return majorityOf(q.stable, func(m Member) bool {
		p, self := n.peerIn(cur, m.ID)
		switch {
		case self:
			return true
		case p == nil, n.disagreesLong(p, cur):
			return false
		case p.stableEpoch == q.epoch && p.stableID == q.stable.id:
			return true
		case p.stableEpoch == q.epoch+1 && p.stableID == cur.id && p.stablePrev != nil && p.stablePrev.id == q.stable.id:
			// It moved from this stable view to the current view, as this
			// node is about to: still a holder of this one.
			return true
		case bootstrap:
			return p.stableEpoch == 0 && p.viewID == cur.id
		case !catchingUp:
			return false
		case q.prev != nil && p.stableEpoch == q.epoch-1 && p.stableID == q.prev.id:
			return true
		default:
			return p.stableEpoch < q.epoch && p.viewID == q.stable.id
		}
	})
}

// viewDisagreementGrace is how long a peer's current view may differ from
// this node's, without a break, while the peer still counts towards its
// majority: 3 heartbeat intervals, or a quarter of MemberTimeout if that is
// longer. Failure detectors fire about a heartbeat apart (more on a loaded
// machine), so views disagree that long after every crash. Past it the
// disagreement is a partition that is not transitive (a route cut between
// two servers of three: the nodes behind it lose each other, the third
// sees both) or a one-way stall, where counting each other let two nodes
// each count a majority and both own the topics they took from each other.
// Measured without a break, not since the last change: a join or a crash
// elsewhere moves every view, and restarting the clock then let the nodes
// behind a cut count each other again.
func (n *Node) viewDisagreementGrace() time.Duration {
	return max(3*n.cfg.HeartbeatInterval, n.cfg.MemberTimeout/4)
}

// disagreesLong reports whether p's current view has differed from cur for
// longer than viewDisagreementGrace. Callers hold members.mu.
func (n *Node) disagreesLong(p *peer, cur *view) bool {
	return p.viewID != cur.id && !p.disagreeSince.IsZero() && time.Since(p.disagreeSince) > n.viewDisagreementGrace()
}

// forgetLeaver drops a member that left gracefully from the stable view,
// so a cluster scaled down by graceful leaves keeps its majority: the next
// epoch, which every member holding this one computes alike. A leaver that
// held a majority names the view it hands on in its LEAVE (handOver), and
// that one is taken. When neither has a member in sight, this node, if it
// holds a majority, takes its own view without the leaver: the members
// that counted the leaver (the half that wins a tie, or the whole view)
// would otherwise be left holding a view none of them can serve in, or an
// empty one. It runs before the view without the leaver is installed.
// Callers hold members.mu.
func (n *Node) forgetLeaver(id string, hb *wire.Heartbeat) {
	q := &n.members.quorum
	st := q.stable
	if st == nil || q.epoch+1 >= maxStableEpoch {
		return
	}
	serving := q.has.Load() && q.confirmed
	next := n.listedView(hb.GetStableMembers(), hb.GetStableId())
	if next == nil || hb.GetStableEpoch() != q.epoch+1 || hb.GetPrevId() != st.id {
		if _, ok := st.member(id); !ok || !serving {
			return // an unconfirmed change still needs its old view: the next advance drops the leaver
		}
		next = newView(st.epoch, membersWithout(st, id))
	}
	if !n.inSight(next, id) {
		if !serving {
			return
		}
		next = newView(st.epoch, membersWithout(n.view(), id))
	}
	if len(next.members) == 0 {
		return
	}
	q.setStable(q.epoch+1, next, st, false)
	if majorityOf(q.prev, n.movedTo(q.epoch, q.stable.id)) {
		q.confirm() // the leaver is buried: with this node, a majority may be
	}
}

// handOver, run as this node starts to leave gracefully, picks the stable
// view its LEAVE hands on while it holds a majority: its stable view
// without it, or its current view without it when none of that view's
// other members is in sight. Callers hold members.mu.
func (n *Node) handOver() {
	q := &n.members.quorum
	if q.stable == nil || !q.has.Load() || !q.confirmed || q.epoch+1 >= maxStableEpoch {
		return
	}
	if _, ok := q.stable.member(n.self.ID); !ok {
		// A joiner that leaves before a stable view held it (a client-only
		// one serves from the view it adopted): handing on the same
		// members would only move the others to the next epoch.
		return
	}
	next := newView(q.stable.epoch, membersWithout(q.stable, n.self.ID))
	if !n.inSight(next, n.self.ID) {
		next = newView(q.stable.epoch, membersWithout(n.view(), n.self.ID))
	}
	if len(next.members) == 0 {
		// Alone and serving: nobody hears the LEAVE, which then stops the
		// service as a crash of this node would (under KeepMajority).
		if n.cfg.PartitionPolicy == KeepMajority {
			n.log.Warn("partition policy: leaving alone with the majority; the others stop serving until this node's ID returns or they are restarted", "stable", len(q.stable.members))
		}
		return
	}
	q.leave.Store(&stableReport{epoch: q.epoch + 1, id: next.id, members: next.refs(), prev: q.stable.refs(), prevID: q.stable.id})
}

// membersWithout returns v's members but id.
func membersWithout(v *view, id string) []Member {
	out := make([]Member, 0, len(v.members))
	for _, m := range v.members {
		if m.ID != id {
			out = append(out, m)
		}
	}
	return out
}

// inSight reports whether v holds this node, or a member of its current
// view other than leaver.
func (n *Node) inSight(v *view, leaver string) bool {
	cur := n.view()
	return slices.ContainsFunc(v.members, func(m Member) bool {
		_, ok := cur.member(m.ID)
		return m.ID == n.self.ID || ok && m.ID != leaver
	})
}

// servesAsOwner reports whether the partition policy lets this node serve
// its topics now.
func (n *Node) servesAsOwner() bool {
	return n.cfg.PartitionPolicy != KeepMajority || n.members.quorum.has.Load()
}

// notServingReason says why the partition policy keeps this node from
// serving its topics, for the answers it refuses them with; "" when it
// serves them.
func (n *Node) notServingReason() string {
	if n.servesAsOwner() {
		return ""
	}
	return fmt.Sprintf("%s sees no majority of its last stable view (PartitionPolicy KeepMajority) and serves none of its topics until it does", n.self.ID)
}

// majorityOf reports whether the members of stable that counts accepts are
// a strict majority of it (by ID), or exactly half including its lowest ID.
func majorityOf(stable *view, counts func(Member) bool) bool {
	seen := 0
	for _, m := range stable.members {
		if counts(m) {
			seen++
		}
	}
	if len(stable.members) == 0 {
		return false
	}
	if 2*seen != len(stable.members) {
		return 2*seen > len(stable.members)
	}
	return counts(stable.members[0])
}
