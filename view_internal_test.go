package pubsub

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func membersNamed(n int) []Member {
	ms := make([]Member, n)
	for i := range ms {
		ms[i] = Member{ID: fmt.Sprintf("m%03d", i), Incarnation: uint64(i + 1)}
	}
	return ms
}

func TestViewHistoryMemoryIsLinearInMembers(t *testing.T) {
	for _, size := range []int{3, 12, 96, 1024} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			var h viewHistory
			all := membersNamed(size)
			for epoch := range uint64(500) {
				// Churn: every view drops one member in turn.
				ms := append([]Member(nil), all[:epoch%uint64(size)]...)
				ms = append(ms, all[epoch%uint64(size)+1:]...)
				h.remember(newView(epoch, ms))
				assert.LessOrEqual(t, h.entries, max(historyPerMember*len(ms), 2*size), "member entries kept")
				assert.LessOrEqual(t, len(h.views), maxViewHistory)
				assert.GreaterOrEqual(t, len(h.views), min(int(epoch)+1, 2), "the two newest views are always kept")
			}
			sum := 0
			for _, v := range h.views {
				sum += len(v.members)
			}
			assert.Equal(t, sum, h.entries, "entries counts what is kept")
			assert.Equal(t, uint64(499), h.views[len(h.views)-1].epoch)
		})
	}
}

func TestViewHistoryForgetsConservatively(t *testing.T) {
	var h viewHistory
	ms := membersNamed(4)
	for epoch := range uint64(100) {
		h.remember(newView(epoch, append([]Member(nil), ms...)))
	}
	topic := "t"
	self := h.views[0].ownerOf(topic).ID
	oldest := h.views[0].epoch
	require.Greater(t, oldest, uint64(1), "the history was trimmed")
	assert.True(t, h.ownedThroughout(self, topic, oldest-1, 99), "owned in every view the history reaches")
	assert.False(t, h.ownedThroughout(self, topic, oldest-2, 99), "a view the history forgot counts as not owned")
	assert.Nil(t, h.at(oldest-1))
	assert.Equal(t, oldest, h.at(oldest).epoch)
}

func TestJoinRepliesListMembersFromFewMembers(t *testing.T) {
	for _, size := range []int{1, 3, 4, 12, 96} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			v := newView(1, membersNamed(size))
			for j := range 20 {
				joiner := fmt.Sprintf("joiner-%d", j)
				var listers []string
				for _, m := range v.members {
					if v.listsFor(joiner, m.ID) {
						listers = append(listers, m.ID)
					}
				}
				require.Len(t, listers, min(size, joinListers))
				// A lister that sees only itself and part of the view (it
				// joined recently) still lists.
				for _, id := range listers {
					m, _ := v.member(id)
					small := newView(1, []Member{m, v.members[0]})
					assert.True(t, small.listsFor(joiner, id), "%s lists in a smaller view", id)
				}
			}
		})
	}
}

// A view rebuilt from its refs (a requester's view in a sync or handover
// request) is the same view: same ID, same owners. viewOf dropped
// ClientOnly, so with a client-only member a third of the topics had
// another owner on the answering side, whose answers then left out their
// subscriber sets.
func TestViewOfKeepsClientOnly(t *testing.T) {
	v := newView(1, []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}, {ID: "c", Incarnation: 3, ClientOnly: true}})
	w := viewOf(v.refs())
	require.Equal(t, v.id, w.id)
	for i := range 1000 {
		topic := fmt.Sprintf("t%d", i)
		require.Equal(t, v.ownerOf(topic).ID, w.ownerOf(topic).ID, "owner of %s", topic)
	}
}

// TestViewHistoryNamesReturnedMembers: a member missing from a view after
// being in an earlier one, and back in the next, is a returned member (its
// subscriptions may sit with another owner); a member seen for the first
// time, one that restarted (another incarnation), or self is not.
func TestViewHistoryNamesReturnedMembers(t *testing.T) {
	self, a, b := Member{ID: "self", Incarnation: 1}, Member{ID: "a", Incarnation: 1}, Member{ID: "b", Incarnation: 1}
	restarted := Member{ID: "a", Incarnation: 2}
	for _, tc := range []struct {
		name    string
		history [][]Member
		next    []Member
		want    uint64
	}{
		{"first join", [][]Member{{self}}, []Member{self, a}, 0},
		{"a second member joins", [][]Member{{self, a}}, []Member{self, a, b}, 0},
		{"back after a cut", [][]Member{{self, a, b}, {self}}, []Member{self, a, b}, 1},
		{"back after views without it", [][]Member{{self, a}, {self}, {self, b}}, []Member{self, a, b}, 2},
		{"restarted", [][]Member{{self, a}, {self}}, []Member{self, restarted}, 0},
		{"self alone before", [][]Member{{a}, {self, a}}, []Member{self, a}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h viewHistory
			for i, ms := range tc.history {
				h.remember(newView(uint64(i), append([]Member(nil), ms...)))
			}
			next := newView(uint64(len(tc.history)), append([]Member(nil), tc.next...))
			assert.Equal(t, tc.want, h.returnedBefore(next, self.ID))
		})
	}
}
