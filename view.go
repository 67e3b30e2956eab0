package pubsub

import (
	"encoding/binary"
	"slices"
	"strings"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Views and ownership: an immutable member list with an ID that hashes it,
// and rendezvous hashing over it.

// Member is one live node in a view.
type Member struct {
	ID          string // node ID
	Incarnation uint64 // changes every time a node with this ID joins
	Inbox       string // the node's inbox subject, <prefix>.node.<ID>
	ClientOnly  bool   // the node never owns a topic (WithClientOnly)
}

// view is an immutable membership snapshot. epoch counts this node's view
// changes; id hashes the member list so nodes can tell when views agree.
type view struct {
	id      uint64
	epoch   uint64
	members []Member // sorted by ID, includes self
	keys    []uint64 // keys[i]: members[i]'s rendezvous key, hashed once per view
	// owners indexes the members that may own topics (not client-only):
	// rendezvous runs over them alone.
	owners []int
	// returned is the last epoch before this view in which one of its
	// members was missing after having been in an earlier view (0: none
	// known): a member back from a partition or a false suspicion, whose
	// subscriptions made meanwhile another owner may hold. Set by
	// viewHistory.returnedBefore when the view is installed, carried
	// forward from the view before, and the previous epoch when a member
	// new to the view was heard first by a heartbeat, not its JOIN (it ran
	// without this node: recomputeView, membership.views.ranApart).
	returned uint64
}

func newView(epoch uint64, members []Member) *view {
	slices.SortFunc(members, func(a, b Member) int { return strings.Compare(a.ID, b.ID) })
	h := uint64(fnvOffset)
	for _, m := range members {
		h = fnvString(h, m.ID)
		h = fnvUint(h, m.Incarnation)
		if m.ClientOnly {
			h = fnvUint(h, 1)
		}
	}
	keys := make([]uint64, len(members))
	owners := make([]int, 0, len(members))
	for i, m := range members {
		keys[i] = mix64(fnvString(fnvOffset, m.ID))
		if !m.ClientOnly {
			owners = append(owners, i)
		}
	}
	return &view{id: mix64(h), epoch: epoch, members: members, keys: keys, owners: owners}
}

// refs lists the view's members for the wire.
func (v *view) refs() []*wire.MemberRef {
	refs := make([]*wire.MemberRef, len(v.members))
	for i, m := range v.members {
		refs[i] = m.ref()
	}
	return refs
}

// ref names m's incarnation on the wire.
func (m Member) ref() *wire.MemberRef {
	return &wire.MemberRef{NodeId: m.ID, Incarnation: m.Incarnation, ClientOnly: m.ClientOnly}
}

// member returns the member with the given ID.
func (v *view) member(id string) (Member, bool) {
	i, ok := slices.BinarySearchFunc(v.members, id, func(m Member, id string) int { return strings.Compare(m.ID, id) })
	if !ok {
		return Member{}, false
	}
	return v.members[i], true
}

// holds reports whether m, in its incarnation, is in the view.
func (v *view) holds(m Member) bool {
	cur, ok := v.member(m.ID)
	return ok && cur.Incarnation == m.Incarnation
}

// holdsAll reports whether every member of w, in its incarnation, is in v.
func (v *view) holdsAll(w *view) bool {
	for _, m := range w.members {
		if !v.holds(m) {
			return false
		}
	}
	return true
}

// has reports whether the member's incarnation is in the view.
func (v *view) has(ref *wire.MemberRef) bool {
	m, ok := v.member(ref.GetNodeId())
	return ok && m.Incarnation == ref.GetIncarnation()
}

// ownerOf returns the rendezvous owner of topic: the member, among those
// that may own, with the highest hash of (topic, member ID). Only topics of
// a joining or leaving member move. The zero Member (ID "") when every
// member is client-only.
func (v *view) ownerOf(topic string) Member {
	if len(v.owners) == 0 {
		return Member{}
	}
	// The topic is hashed once, each member's key once per view: a lookup
	// costs one mix per member, not a hash of the member's ID.
	t := mix64(fnvString(fnvOffset, topic) ^ 0xff)
	best, bestH := v.owners[0], uint64(0)
	for j, i := range v.owners {
		if h := mix64(t ^ v.keys[i]); j == 0 || h > bestH {
			best, bestH = i, h
		}
	}
	return v.members[best]
}

// joinListers is how many members answer a JOIN with their member list;
// the others answer with themselves only. Every member answers every JOIN,
// so a joiner hears each member directly; the lists only cover a member
// whose answer was lost. Listing from every member made a concurrent join
// of N nodes cost O(N^3) member entries on the wire.
const joinListers = 3

// listsFor reports whether self is one of the joinListers members of the
// view that rank highest for joiner. Views may disagree: a member ranks
// itself no lower in its own, smaller view, so the true top members list.
func (v *view) listsFor(joiner, self string) bool {
	if len(v.members) <= joinListers {
		return true
	}
	j := mix64(fnvString(fnvOffset, joiner) ^ 0x5a)
	i, ok := slices.BinarySearchFunc(v.members, self, func(m Member, id string) int { return strings.Compare(m.ID, id) })
	if !ok {
		return true
	}
	mine, above := mix64(j^v.keys[i]), 0
	for k, key := range v.keys {
		if k != i && mix64(j^key) > mine {
			if above++; above >= joinListers {
				return false
			}
		}
	}
	return true
}

const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

func fnvString(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime
	}
	return h
}

func fnvUint(h uint64, x uint64) uint64 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], x)
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime
	}
	return h
}

// mix64 is splitmix64's finaliser: FNV alone clusters similar strings.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
