package pubsub

import (
	"log/slog"
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

// Found by the suite under load: n2 advanced alone to a stable view with a
// joiner (its tick came first), and the joiner left gracefully before n0
// and n1 advanced. n0 and n1 kept the view before, n2 could neither
// confirm its change nor go back (the half of its view that reports the
// view before lost the tie to the joiner's lower ID) and stopped serving
// for good. A member that left gracefully holds no line: counted with the
// reporters, n2 goes back. One that is merely out of sight (it may hold
// the line elsewhere) still keeps n2 where it is.
func TestStrandedAdvanceReturnsOnceItsJoinerLeftGracefully(t *testing.T) {
	for _, tc := range []struct {
		name       string
		leftGently bool
		wantEpoch  uint64
		wantQuorum bool
	}{
		{"joiner left gracefully", true, 1, true},
		{"joiner out of sight", false, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n0, n1, n2 := Member{ID: "n0", Incarnation: 1}, Member{ID: "n1", Incarnation: 1}, Member{ID: "n2", Incarnation: 1}
			j0 := Member{ID: "j0", Incarnation: 1, ClientOnly: true}
			n := &Node{self: n2, cfg: Config{MemberTimeout: time.Minute, HeartbeatInterval: time.Second, PartitionPolicy: KeepMajority},
				log: nodeLogger{Logger: slog.New(slog.DiscardHandler)}}
			n.members.peers = map[string]*peer{}
			n.members.left = map[incarnation]time.Time{}
			before := newView(1, []Member{n0, n1, n2})
			advanced := newView(2, []Member{j0, n0, n1, n2})
			n.members.views.cur.Store(before) // the joiner is gone
			q := &n.members.quorum
			q.setStable(2, advanced, before, false)
			if tc.leftGently {
				n.members.bury(j0, 10)
			}
			for _, m := range []Member{n0, n1} {
				n.members.peers[m.ID] = &peer{m: m, lastSeen: time.Now().Add(time.Millisecond), viewID: before.id,
					stableEpoch: 1, stableID: before.id, stableConfirmed: true}
			}
			n.members.mu.Lock()
			has := n.evaluateQuorum(before, true)
			n.members.mu.Unlock()
			assert.Equal(t, tc.wantEpoch, q.epoch, "stable epoch")
			assert.Equal(t, tc.wantQuorum, has, "quorum")
			if tc.wantEpoch == 1 {
				assert.Equal(t, before.id, q.stable.id, "back on the view n0 and n1 hold")
			}
		})
	}
}
