package pubsub

import (
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Settings the members of a cluster must agree on, and nothing else checks:
// a node whose heartbeats come further apart than half a peer's
// MemberTimeout drops out of that peer's view over and over (its topics
// moving each time), and with mixed partition policies a partition is
// handled by each node's own: KeepServing nodes serve on every side, also
// where the KeepMajority ones stop. (The majority itself survives a mixed
// cluster: every node reports its stable views, whatever its policy, so a
// KeepMajority node counts KeepServing members as it counts its own kind,
// and a rolling change of the policy keeps it through one crash of three:
// TestMixedPartitionPolicy*.) Heartbeats carry both settings; a node that
// hears a peer disagree with its own logs a warning (throttled), once per
// change of what that peer says.

// peerSettings is what a peer's heartbeats last said of its settings.
type peerSettings struct {
	heartbeatMs uint32 // 0: not said (an older member)
	policy      uint32 // PartitionPolicy + 1; 0: not said
}

// settingsOf returns what ref says of its sender's settings.
func settingsOf(ref *wire.MemberRef) peerSettings {
	return peerSettings{heartbeatMs: ref.GetHeartbeatIntervalMs(), policy: ref.GetPartitionPolicy()}
}

// stampSettings puts this node's settings into ref, for a heartbeat.
func (n *Node) stampSettings(ref *wire.MemberRef) {
	ref.HeartbeatIntervalMs = uint32(min(n.cfg.HeartbeatInterval.Milliseconds(), 1<<31))
	ref.PartitionPolicy = uint32(n.cfg.PartitionPolicy) + 1
}

// checkSettings warns when p's settings, as ref says them, disagree with
// this node's, once per change of what p says. Callers hold members.mu.
func (n *Node) checkSettings(p *peer, ref *wire.MemberRef) {
	said := settingsOf(ref)
	if said == p.settings {
		return
	}
	p.settings = said
	beat := time.Duration(said.heartbeatMs) * time.Millisecond
	// Only a peer slower than this node: with the same settings everywhere
	// there is nothing to disagree on (Config validation is the check).
	slow := said.heartbeatMs > 0 && beat > n.cfg.MemberTimeout/2 && beat > n.cfg.HeartbeatInterval
	policy := said.policy > 0 && PartitionPolicy(said.policy-1) != n.cfg.PartitionPolicy
	if !slow && !policy {
		return
	}
	n.stats.settingsMismatches.Add(1)
	if slow {
		if ok, held := n.log.limit.allow("members/settings/heartbeat"); ok {
			n.log.Warn("member heartbeats too seldom for this node's MemberTimeout: it will drop out of this node's view over and over; give every node a HeartbeatInterval well below every MemberTimeout",
				"member", p.m.ID, "its_heartbeat_interval", beat, "member_timeout", n.cfg.MemberTimeout, "suppressed", held)
		}
	}
	if policy {
		if ok, held := n.log.limit.allow("members/settings/policy"); ok {
			n.log.Warn("member runs another PartitionPolicy: every member must run the same one (a KeepServing member keeps serving on a side where KeepMajority ones stop)",
				"member", p.m.ID, "its_policy", PartitionPolicy(said.policy-1), "policy", n.cfg.PartitionPolicy, "suppressed", held)
		}
	}
}
