package pubsub

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

func TestMajorityOfBreaksTiesByTheLowestID(t *testing.T) {
	v := newView(1, []Member{{ID: "a"}, {ID: "b"}, {ID: "c"}, {ID: "d"}})
	in := func(ids ...string) func(Member) bool {
		return func(m Member) bool {
			for _, id := range ids {
				if m.ID == id {
					return true
				}
			}
			return false
		}
	}
	for _, tc := range []struct {
		name string
		ids  []string
		want bool
	}{
		{"three of four", []string{"b", "c", "d"}, true},
		{"half with the lowest", []string{"a", "d"}, true},
		{"half without the lowest", []string{"b", "c"}, false},
		{"one of four", []string{"a"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, majorityOf(v, in(tc.ids...)))
		})
	}
}

// A stable view listed in a heartbeat is believed only when it is well
// formed, within MaxMembers, and hashes to the ID the heartbeat gives.
func TestListedStableViewIsChecked(t *testing.T) {
	n := &Node{cfg: Config{MaxMembers: 3}}
	members := []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}}
	v := newView(0, members)
	refs := v.refs()
	assert.Equal(t, v.id, n.listedView(refs, v.id).id, "a well-formed list with its ID")
	assert.Nil(t, n.listedView(refs, v.id+1), "an ID the members do not hash to")
	assert.Nil(t, n.listedView(nil, v.id), "no list")
	bad := append(v.refs(), &wire.MemberRef{NodeId: "has space"})
	assert.Nil(t, n.listedView(bad, newView(0, []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}, {ID: "has space"}}).id), "an invalid node ID")
	long := append(v.refs(), &wire.MemberRef{NodeId: "c"}, &wire.MemberRef{NodeId: "d"})
	assert.Nil(t, n.listedView(long, newView(0, []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}, {ID: "c"}, {ID: "d"}}).id), "more than MaxMembers")
}

// Found by the soak test: members that moved to another line's view of the
// same epoch (the other side of a partition advanced from the same view)
// confirmed this node's change, and after a quick heal and re-partition
// both lines served. Only this line's view, or the next one made from it,
// counts.
func TestMovedToCountsOnlyThisLine(t *testing.T) {
	n := &Node{self: Member{ID: "b"}, cfg: Config{MemberTimeout: time.Minute}}
	n.members.peers = map[string]*peer{}
	n.members.left = map[incarnation]time.Time{}
	prev := newView(0, []Member{{ID: "a"}, {ID: "b"}, {ID: "c"}})
	mine := newView(0, []Member{{ID: "a"}, {ID: "b"}, {ID: "c"}, {ID: "d"}, {ID: "e"}})
	sibling := newView(0, []Member{{ID: "a"}, {ID: "c"}})
	report := func(epoch uint64, v, from *view) {
		for _, id := range []string{"a", "c"} {
			n.members.peers[id] = &peer{m: Member{ID: id}, stableEpoch: epoch, stableID: v.id, stablePrev: from}
		}
	}
	for _, tc := range []struct {
		name        string
		epoch       uint64
		v, from     *view
		wantConfirm bool
	}{
		{"a sibling of the same epoch", 5, sibling, prev, false},
		{"the sibling's next view", 6, mine, sibling, false},
		{"this view", 5, mine, prev, true},
		{"the next view made from this one", 6, sibling, mine, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			report(tc.epoch, tc.v, tc.from)
			assert.Equal(t, tc.wantConfirm, majorityOf(prev, n.movedTo(5, mine.id)))
		})
	}
	n.members.peers = map[string]*peer{}
	n.members.bury(Member{ID: "a"}, 10)
	n.members.bury(Member{ID: "c"}, 10)
	assert.True(t, majorityOf(prev, n.movedTo(5, mine.id)), "members that left gracefully count as moved")
}

func TestMajorityOfAnEmptyViewIsNone(t *testing.T) {
	assert.False(t, majorityOf(newView(0, nil), func(Member) bool { return true }))
}
