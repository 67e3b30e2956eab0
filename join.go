package pubsub

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"
)

// Joining: announce the node and wait for a stable initial view.

// joinView announces this node and waits until its view is stable: no new
// member for a quiet period, and every member reports the same view. A lone
// node returns after the quiet period when nobody else subscribes to the
// members subject (audience false, membersAudience); when someone does,
// it waits for a member to answer, until MemberTimeout, rather than take
// a slow answer for no member: returning alone, it would serve every topic
// by itself until heartbeats merged the views. A member closing answers
// with its LEAVE (onMembers): that audience was leaving, and the node
// joins alone after the quiet period.
func (n *Node) joinView(ctx context.Context, audience bool) error {
	// Every member answers each of the JOIN's resends: room for a few rounds
	// of a full view, so no reply is dropped as a slow consumer.
	replies := make(chan *nats.Msg, 4*n.cfg.MaxMembers)
	inbox := n.nc.NewInbox()
	sub, err := n.nc.ChanSubscribe(inbox, replies)
	if err != nil {
		return err
	}
	defer func() {
		// Replies dropped as a slow consumer cost a resend round, or a
		// member learnt late from heartbeats: worth knowing.
		if d, _ := sub.Dropped(); d > 0 {
			n.log.Warn("join replies dropped: slow consumer", "dropped", d)
		}
		_ = sub.Unsubscribe()
	}()
	// FlushWithContext needs a deadline; Join's ctx need not have one.
	fctx, cancel := context.WithTimeout(ctx, n.cfg.RequestTimeout)
	err = n.nc.FlushWithContext(fctx)
	cancel()
	if err != nil {
		return err
	}
	quiet := min(n.cfg.HeartbeatInterval, 100*time.Millisecond)
	start := time.Now()
	lastChange, lastInstall := start, time.Time{}
	// Re-announce: a reply can be lost while our reply subscription's interest
	// travels to the other servers.
	resend := []time.Duration{0, quiet / 4, quiet / 2, quiet, 2 * quiet, 4 * quiet}
	deadline := time.NewTimer(n.cfg.MemberTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(max(quiet/8, time.Microsecond)) // a HeartbeatInterval under 8ns made it 0: a panic
	defer tick.Stop()
	refusals := joinRefusals{latest: map[string]uint32{}}
	heard := false // a peer was heard: the view is no longer this node alone
	// left: a member answered that it is leaving (onMembers): the audience
	// the probe found may have been only that member.
	left := false
	// unanswered: someone subscribes to the members subject, and no
	// member has answered for it yet.
	unanswered := func() bool { return audience && !heard && !left }
	for {
		if len(resend) > 0 && time.Since(start) >= resend[0] {
			resend = resend[1:]
			n.sendHeartbeat(wire.Heartbeat_JOIN, inbox)
		}
		select {
		case <-ctx.Done():
			if unanswered() {
				return fmt.Errorf("%w: Join's ctx ended %v into its wait, and no member had answered, though another connection subscribes to %s (a member slow to answer, or a tool or stream on the subject); Join waits up to MemberTimeout (%v) for an answer there: give its ctx that long",
					ctx.Err(), time.Since(start).Round(time.Millisecond), n.members.subject, n.cfg.MemberTimeout)
			}
			return ctx.Err()
		case <-n.life.ctx.Done():
			// The node stopped under Join (the heartbeat loop found its
			// connection closed, or it learnt it was replaced): nothing
			// here can succeed, so fail now rather than at the deadline.
			why := "a newer node with its ID replaced it"
			if n.nc.IsClosed() {
				why = fmt.Sprintf("its NATS connection closed (last NATS error: %v)", n.nc.LastError())
			}
			return fmt.Errorf("%w: the node stopped while joining: %s", ErrClosed, why)
		case <-deadline.C:
			if !refusals.asked && n.refusersDisagree(refusals.latest) {
				// Room may come just now: a member that crashed as this
				// node joined times out at its peers about MemberTimeout
				// after, plus their sweep's tick and any lag. Ask again
				// four times over a grace of a quarter of MemberTimeout
				// (at least two heartbeat intervals), and decide on the
				// last answers.
				refusals.ask()
				grace := max(2*n.cfg.HeartbeatInterval, n.cfg.MemberTimeout/4)
				elapsed := time.Since(start)
				resend = resend[:0]
				for k := range 4 {
					resend = append(resend, elapsed+time.Duration(k)*grace/4)
				}
				deadline.Reset(grace + quiet)
				continue
			}
			if err := refusals.verdict(); err != nil && n.refusersDisagree(refusals.latest) {
				return err
			}
			// Views still disagree; heartbeats will converge them.
			n.installPending()
			if unanswered() {
				n.log.Warn("joined alone: no member answered, though another connection subscribes to the members subject (a member that cannot answer, or a tool subscribed to it)",
					"subject", n.members.subject, "waited", n.cfg.MemberTimeout)
				return nil
			}
			n.log.Info("joined before views converged", "node", n.self.ID)
			return nil
		case m := <-replies:
			var env wire.Envelope
			if proto.Unmarshal(m.Data, &env) != nil {
				continue
			}
			hb := env.GetHeartbeat()
			if hb == nil || hb.GetFrom().GetNodeId() == n.self.ID || natsutil.ValidateNodeID(hb.GetFrom().GetNodeId()) != nil {
				continue
			}
			if hb.GetKind() == wire.Heartbeat_LEAVE {
				// Not a member to add. Incarnation 0 is no node's (the
				// probes' LEAVE): not taken for a leaver's answer.
				left = left || hb.GetFrom().GetIncarnation() != 0
				continue
			}
			n.members.mu.Lock()
			n.heard(hb)
			for _, ref := range hb.GetMembers() {
				if ref.GetNodeId() != n.self.ID && natsutil.ValidateNodeID(ref.GetNodeId()) == nil {
					n.listedWhileJoining(ref)
				}
			}
			refusals.note(hb.GetFrom().GetNodeId(), hb.GetRefusedMaxMembers())
			n.members.mu.Unlock()
		case <-tick.C:
		}
		if n.members.sameID.idConflict.Load() {
			return fmt.Errorf("%w: node ID %q is in use by another live node (one still draining its Close counts); choose another NodeID, or join once that node's Close returned", ErrInvalidConfig, n.self.ID)
		}
		// Peers heard since the last install join the view together, at
		// most once a tick: a view per answer would cost a handoff round
		// per member.
		if time.Since(lastInstall) >= quiet/8 && n.installPending() {
			lastInstall, lastChange = time.Now(), time.Now()
		}
		if audience && !heard {
			heard = n.hasPeers()
		}
		if time.Since(lastChange) >= quiet && !unanswered() && n.viewsAgree() {
			return nil
		}
	}
}

// answerJoin answers the JOIN of joiner, just heard, with this node's view:
// each member with how long since this node heard it, so a member that
// crashed just before the join is not new to the joiner; and, when the
// view's size kept the joiner out, this node's MaxMembers, so its Join
// fails saying why instead of returning into a view no one shares. Callers
// hold members.mu.
func (n *Node) answerJoin(joiner *wire.MemberRef, reply string) {
	n.publishEnvelope(reply, &wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: n.joinReplyLocked(joiner)}})
}

// joinReplyLocked builds answerJoin's reply. Callers hold members.mu.
func (n *Node) joinReplyLocked(joiner *wire.MemberRef) *wire.Heartbeat {
	v := n.view()
	hb := &wire.Heartbeat{Kind: wire.Heartbeat_JOIN_REPLY, From: n.beatRef(), ViewId: v.id}
	if v.listsFor(joiner.GetNodeId(), n.self.ID) {
		hb.Members = v.refs()
		now := time.Now()
		for _, ref := range hb.Members {
			switch p := n.members.peers[ref.GetNodeId()]; {
			case ref.GetNodeId() == n.self.ID:
			case p != nil && p.m.Incarnation == ref.GetIncarnation():
				ref.SilentMs = uint32(min(now.Sub(p.lastSeen).Milliseconds(), math.MaxUint32))
			default:
				// Dropped, and its view change not installed yet (this
				// node is joining itself): not to be taken for heard now.
				ref.SilentMs = math.MaxUint32
			}
		}
	}
	if _, known := n.members.peers[joiner.GetNodeId()]; !known && n.viewFullLocked() {
		hb.RefusedMaxMembers = uint32(min(int64(n.cfg.MaxMembers), math.MaxUint32))
	}
	n.members.quorum.stampHeartbeat(hb)
	return hb
}

// membersAudience reports whether a connection other than this node's
// subscribes to the members subject: some member is there to answer the
// JOIN, however slowly. It publishes a LEAVE of incarnation 0 (which every
// member ignores, as checkPermissions' probe) with a reply subject, before
// the node subscribes to the members subject itself, then flushes: a server
// that delivered it to nobody, in its cluster or beyond, answers "no
// responders" (a 503 status) before the flush's PONG, as it handles the
// connection's protocol in order. Without that answer (a connection to a
// server too old for headers, or a subscriber) it reports true, the side
// that costs a lone node time, never a split view.
func (n *Node) membersAudience(ctx context.Context) (bool, error) {
	if !n.nc.HeadersSupported() {
		return true, nil
	}
	answers := make(chan *nats.Msg, 1)
	sub, err := n.nc.ChanSubscribe(n.nc.NewInbox(), answers)
	if err != nil {
		return false, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	probe, err := n.ignoredLeave()
	if err != nil {
		return false, err
	}
	if err := n.nc.PublishMsg(&nats.Msg{Subject: n.members.subject, Reply: sub.Subject, Data: probe}); err != nil {
		return false, err
	}
	fctx, cancel := context.WithTimeout(ctx, n.cfg.RequestTimeout)
	defer cancel()
	if err := n.nc.FlushWithContext(fctx); err != nil {
		return false, err
	}
	select {
	case m := <-answers:
		return !natsutil.IsNoRespondersMsg(m), nil
	default:
		return true, nil
	}
}

// hasPeers reports whether this node has heard any other member.
func (n *Node) hasPeers() bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return len(n.members.peers) > 0
}

// listedWhileJoining adds ref, a member a JOIN_REPLY listed, as heard when
// the replier last heard it: a member that crashed just before this join
// then times out here when it does at its peers, and Join returns once they
// agree without it, instead of waiting for it until its own deadline and
// keeping it up to MemberTimeout after. One a replier has not heard from for
// MemberTimeout (its own may be longer) is left out. A member listed again
// keeps the most recent of the times. Callers hold members.mu.
func (n *Node) listedWhileJoining(ref *wire.MemberRef) {
	silent := time.Duration(ref.GetSilentMs()) * time.Millisecond
	if silent >= n.cfg.MemberTimeout {
		return
	}
	id := ref.GetNodeId()
	if _, known := n.members.peers[id]; !known {
		n.seen(ref, 0, false)
		if p := n.members.peers[id]; p != nil && p.m.Incarnation == ref.GetIncarnation() {
			p.lastSeen = time.Now().Add(-silent)
		}
		return
	}
	if p := n.members.peers[id]; p.m.Incarnation == ref.GetIncarnation() {
		if heard := time.Now().Add(-silent); heard.After(p.lastSeen) {
			p.lastSeen = heard
		}
	}
}

// joinRefusals follows the members that refused this joiner because their
// views held MaxMembers (Heartbeat.refused_max_members). Room may come
// while it waits (a member timing out), so a refusal fails Join only if it
// stands when asked again at the deadline: then, if every member that
// answered refused, Join fails saying so instead of returning into a view
// nobody shares. A member that answers both ways (a MaxMembers lower than
// the others', or a forged reply) cannot fail a Join the rest accepted.
type joinRefusals struct {
	latest  map[string]uint32 // each replier's last answer: its MaxMembers if it refused, else 0
	asked   bool              // asked again at the deadline; fresh holds the answers since
	fresh   map[string]uint32
	refuser string // one that refused since, for the error
}

func (r *joinRefusals) note(from string, limit uint32) {
	r.latest[from] = limit
	if r.asked {
		r.fresh[from] = limit
		if limit > 0 {
			r.refuser = from
		}
	}
}

func (r *joinRefusals) ask() {
	r.asked, r.fresh = true, map[string]uint32{}
}

// verdict returns the error Join fails with: nil unless it was asked again
// and every member that answered that refused.
func (r *joinRefusals) verdict() error {
	if !r.asked || len(r.fresh) == 0 {
		return nil
	}
	for _, limit := range r.fresh {
		if limit == 0 {
			return nil
		}
	}
	return fmt.Errorf("%w: member %s refused this node: its view holds MaxMembers (%d) members; raise WithMaxMembers on every node, or join once a member left", ErrInvalidConfig, r.refuser, r.fresh[r.refuser])
}

// refusersDisagree reports whether a member whose last answer refused this
// node reports a view other than this node's. Only members heard beating
// count: a refusal from anyone else (a forged reply) is ignored.
func (n *Node) refusersDisagree(latest map[string]uint32) bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	id := n.view().id
	for member, limit := range latest {
		if p := n.members.peers[member]; limit > 0 && p != nil && p.beating && p.viewID != id {
			return true
		}
	}
	return false
}

// markJoined ends joining: from now on a peer heard changes the view at
// once. A peer added since joinView's last install joins the view now.
func (n *Node) markJoined() {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	n.members.joined.Store(true)
	n.installPendingLocked()
}

// installPending installs the view of the peers added while joining, if
// any, and reports whether the view changed.
func (n *Node) installPending() bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.installPendingLocked()
}

func (n *Node) installPendingLocked() bool {
	if !n.members.views.viewPending {
		return false
	}
	n.members.views.viewPending = false
	before := n.view().id
	// The peers heard while joining count as returned (view.returned): a
	// topic actor reconciled to an earlier view (a request that came while
	// joining, answered NOT_READY, made it: served alone, complete for
	// that view) must wait for their subscriptions, not be kept without
	// them. Actors made in the views after it are unaffected.
	n.members.views.ranApart = true
	n.recomputeView()
	return n.view().id != before
}

// viewsAgree reports whether every peer last reported this node's view.
func (n *Node) viewsAgree() bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.viewsAgreeLocked()
}

func (n *Node) viewsAgreeLocked() bool {
	id := n.view().id
	for _, p := range n.members.peers {
		if p.viewID != id {
			return false
		}
	}
	return true
}
