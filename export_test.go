package pubsub

import "slices"

// ViewIDForTest returns the ID of the view of members, as heartbeats carry
// it: tests forging stable views need it.
func ViewIDForTest(members []Member) uint64 { return newView(0, slices.Clone(members)).id }
