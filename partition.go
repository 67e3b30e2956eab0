package pubsub

import (
	"sync/atomic"
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

// quorum tracks, under KeepMajority, whether this node sees a majority of the
// last stable view: the latest view every member reported while this node
// had a majority. A minority never makes its own view stable, so it cannot
// talk itself into a majority.
type quorum struct {
	stable *view // guarded by membership.mu
	has    atomic.Bool
}

// startQuorum makes the view Join settled on the first stable view.
func (n *Node) startQuorum() {
	n.members.mu.Lock()
	n.members.quorum.stable = n.view()
	n.members.quorum.has.Store(true)
	n.members.mu.Unlock()
}

// updateQuorum re-evaluates the quorum; agree says every member reports the
// current view. Callers hold members.mu.
func (n *Node) updateQuorum(agree bool) {
	if n.cfg.PartitionPolicy != KeepMajority || n.members.quorum.stable == nil {
		return
	}
	cur := n.view()
	has := majorityOf(n.members.quorum.stable, cur)
	stable := n.members.quorum.stable
	if has && agree {
		n.members.quorum.stable = cur
	}
	if n.members.quorum.has.Swap(has) == has {
		return
	}
	n.log.Warn("partition policy: quorum changed", "has_quorum", has, "members", len(cur.members), "stable", len(stable.members))
	emit(n.events, QuorumChanged{HasQuorum: has, Members: len(cur.members), Stable: len(stable.members)})
}

// forgetLeaver drops a member that left gracefully from the stable view,
// so a cluster scaled down by graceful leaves keeps its majority. It runs
// before the view without the leaver is installed, and only while this node
// has a majority. Callers hold members.mu.
func (n *Node) forgetLeaver(id string) {
	st := n.members.quorum.stable
	if n.cfg.PartitionPolicy != KeepMajority || st == nil || !n.members.quorum.has.Load() {
		return
	}
	if _, ok := st.member(id); !ok {
		return
	}
	members := make([]Member, 0, len(st.members)-1)
	for _, m := range st.members {
		if m.ID != id {
			members = append(members, m)
		}
	}
	n.members.quorum.stable = newView(st.epoch, members)
}

// servesAsOwner reports whether the partition policy lets this node serve
// its topics now.
func (n *Node) servesAsOwner() bool {
	return n.cfg.PartitionPolicy != KeepMajority || n.members.quorum.has.Load()
}

// majorityOf reports whether cur holds a strict majority of stable's members
// (by ID), or exactly half including stable's lowest ID.
func majorityOf(stable, cur *view) bool {
	seen := 0
	for _, m := range stable.members {
		if _, ok := cur.member(m.ID); ok {
			seen++
		}
	}
	if 2*seen != len(stable.members) {
		return 2*seen > len(stable.members)
	}
	_, ok := cur.member(stable.members[0].ID)
	return ok
}
