package pubsub

import (
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Heartbeats out: the loop that announces this node, drops silent members
// and notices a connection closed underneath the node, and what it sends.

// beatRef is selfRef with what heartbeats say besides: this node's payload
// limit, read anew each time (a reconnect may land on another server), and
// the settings its peers must agree with (peer_settings.go).
func (n *Node) beatRef() *wire.MemberRef {
	ref := n.selfRef()
	ref.MaxPayload = uint64(max(n.nc.MaxPayload(), 0))
	n.stampSettings(ref)
	return ref
}

// heartbeatLoop announces this node and drops silent members. It also
// notices a NATS connection closed underneath the node, and stops it.
func (n *Node) heartbeatLoop() {
	defer n.life.goroutines.done()
	defer close(n.life.beatsStopped)
	t := time.NewTicker(n.cfg.HeartbeatInterval)
	defer t.Stop()
	lastCollect := time.Now()
	var lastEarly time.Time
	var early <-chan time.Time // an early heartbeat deferred by the spacing
	for {
		select {
		case <-n.life.ctx.Done():
			return
		case <-n.life.stopBeats:
			return
		case <-n.members.beatNow:
			// The view changed: tell the peers now, so views agree (and
			// joins return) without waiting for the next tick; a burst of
			// changes gets one early heartbeat per earlyBeatSpacing.
			if wait := earlyBeatSpacing - time.Since(lastEarly); wait > 0 {
				if early == nil {
					early = time.After(wait)
				}
				continue
			}
			lastEarly = time.Now()
			n.sendHeartbeat(wire.Heartbeat_HEARTBEAT, "")
			continue
		case <-early:
			early, lastEarly = nil, time.Now()
			n.sendHeartbeat(wire.Heartbeat_HEARTBEAT, "")
			continue
		case <-t.C:
		}
		if n.nc.IsClosed() {
			n.connectionLost()
			return
		}
		n.members.mu.Lock()
		n.dropSilentLocked()
		n.updateQuorum(n.viewsAgreeLocked())
		by, newer, replaced := n.replacedForGood()
		n.members.mu.Unlock()
		if replaced {
			n.replaced(by, newer)
			return
		}
		// After the sweep and the quorum: the heartbeat carries the view
		// and stable view they just made.
		n.sendHeartbeat(wire.Heartbeat_HEARTBEAT, "")
		select { // a change above asked for an early heartbeat: this is it
		case <-n.members.beatNow:
		default:
		}
		n.checkInboxDrops()
		n.subscriber.forgetRecent(time.Now().Add(-2 * (n.cfg.SubscriberTimeout + n.cfg.RequestTimeout)))
		n.log.limit.sweep()
		if time.Since(lastCollect) >= n.cfg.MemberTimeout {
			lastCollect = time.Now()
			n.owner.collectIdleActors(n.cfg.MemberTimeout)
		}
	}
}

// dropSilentLocked drops the members not heard from for MemberTimeout.
// Callers hold members.mu.
func (n *Node) dropSilentLocked() {
	changed := false
	for id, p := range n.members.peers {
		if time.Since(p.lastSeen) > n.cfg.MemberTimeout {
			delete(n.members.peers, id)
			if n.members.sameID.noteTimedOut(p.m, n.cfg.MaxMembers) {
				n.forgotMember("a member timed out", id)
			}
			changed = true
		}
	}
	if changed {
		n.peersChangedLocked()
	}
}

func (n *Node) sendHeartbeat(kind wire.Heartbeat_Kind, reply string) {
	hb := &wire.Heartbeat{Kind: kind, From: n.beatRef(), ViewId: n.view().id}
	n.members.quorum.stampHeartbeat(hb)
	data, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: hb}})
	msg := &nats.Msg{Subject: n.members.subject, Reply: reply, Data: data}
	if err := n.nc.PublishMsg(msg); err != nil {
		n.log.Debug("heartbeat failed", "err", err)
	}
}

func (n *Node) publishEnvelope(subject string, env *wire.Envelope) {
	data, err := proto.Marshal(env)
	if err == nil {
		err = n.nc.Publish(subject, data)
	}
	if err != nil {
		n.log.Debug("publish failed", "subject", subject, "err", err)
	}
}

// checkInboxDrops surfaces messages NATS dropped on the node's
// subscriptions because it fell behind (slow consumer): deliveries and
// requests on its inbox (their senders see timeouts), replies to its own
// requests (those calls time out), and heartbeats (peers may be suspected).
// This makes the cause visible; the counts are NATS's own, cumulative.
func (n *Node) checkInboxDrops() {
	inbox, err1 := n.life.inboxSub.Dropped()
	replies, err2 := n.rpc.sub.Dropped()
	beats, err3 := n.members.sub.Dropped()
	if err1 != nil || err2 != nil || err3 != nil { // closed: the totals stand
		return
	}
	d := uint64(inbox) + uint64(replies) + uint64(beats)
	if prev := n.stats.inboxDropped.Swap(d); d > prev {
		n.log.Warn("subscription dropped messages: slow consumer", "dropped", d-prev, "total", d,
			"inbox_total", inbox, "replies_total", replies, "heartbeats_total", beats)
	}
}
