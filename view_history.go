package pubsub

import (
	"slices"
	"sync/atomic"
)

// installedViews is what membership keeps of the views this node installs
// (recomputeView): the current one, the recent ones, and what the next
// install must know. Guarded by membership.mu, but cur, which is read
// lock-free.
type installedViews struct {
	cur         atomic.Pointer[view]
	history     viewHistory
	viewPending bool // joining: peers were added and joinView installs their view
	// viewed is closed, and replaced, each time a view is installed
	// (WaitMembers waits on it). Guarded by mu.
	viewed chan struct{}
	// ranApart: the peer seen() is adding was heard first by a heartbeat,
	// not its JOIN: it ran without this node, and what it subscribed to
	// meanwhile went to another owner (view.returned). Consumed by the
	// recomputeView it calls; guarded by mu.
	ranApart bool
}

// viewHistory keeps a node's recent views, oldest first, to decide whether
// the node owned a topic continuously; an actor idle for longer than the
// history reaches re-checks by sync, asking every member again
// (syncRegistry.resync). It keeps at most maxViewHistory views
// and at most historyPerMember member entries per member of the newest view:
// its memory is O(N) with a small factor (about 8 views of the current size),
// however many views a fleet's churn produces. Guarded by membership.mu.
type viewHistory struct {
	views   []*view
	entries int // members summed over views
}

const (
	maxViewHistory   = 64
	historyPerMember = 8
)

// remember appends v and trims the history to its bounds, keeping at least
// the two newest views.
func (h *viewHistory) remember(v *view) {
	h.views = append(h.views, v)
	h.entries += len(v.members)
	budget := historyPerMember * len(v.members)
	drop := 0
	for len(h.views)-drop > 2 && (len(h.views)-drop > maxViewHistory || h.entries > budget) {
		h.entries -= len(h.views[drop].members)
		drop++
	}
	if drop > 0 {
		h.views = slices.Delete(h.views, 0, drop)
	}
}

// ownedThroughout reports whether self owned topic in every view with an
// epoch in (from, to]; false when the history no longer reaches from.
func (h *viewHistory) ownedThroughout(self, topic string, from, to uint64) bool {
	if len(h.views) == 0 || h.views[0].epoch > from+1 {
		return false
	}
	for _, v := range h.views {
		if v.epoch > from && v.epoch <= to && v.ownerOf(topic).ID != self {
			return false
		}
	}
	return true
}

// returnedBefore returns the last epoch of a remembered view (all older
// than next) missing a member of next that an even older one held, in its
// incarnation; 0 when no member of next came back so.
func (h *viewHistory) returnedBefore(next *view, self string) uint64 {
	var last uint64
	for _, m := range next.members {
		if m.ID == self {
			continue
		}
		held := false
		for _, w := range h.views {
			switch {
			case w.holds(m):
				held = true
			case held && w.epoch > last:
				last = w.epoch
			}
		}
	}
	return last
}

// at returns the remembered view with the given epoch, or nil.
func (h *viewHistory) at(epoch uint64) *view {
	for _, v := range h.views {
		if v.epoch == epoch {
			return v
		}
	}
	return nil
}

// byID returns the remembered view with the given ID, or nil.
func (h *viewHistory) byID(id uint64) *view {
	for _, v := range h.views {
		if v.id == id {
			return v
		}
	}
	return nil
}
