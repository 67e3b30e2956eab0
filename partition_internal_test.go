package pubsub

import (
	"testing"

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
