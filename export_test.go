package pubsub

import "slices"

// ViewIDForTest returns the ID of the view of members, as heartbeats carry
// it: tests forging stable views need it.
func ViewIDForTest(members []Member) uint64 { return newView(0, slices.Clone(members)).id }

// StableConfirmedForTest reports whether the node's last stable-view change
// is confirmed (KeepMajority).
func (n *Node) StableConfirmedForTest() bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.members.quorum.confirmed
}
