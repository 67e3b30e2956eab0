package pubsub

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestOwnerPayloadIsTheSmallestOwnerLimit: the limit MaxMessageSize bounds
// a node's own by is the smallest max_payload advertised by a peer that may
// own topics; client-only peers and peers that advertise none (0, from an
// older version) do not count.
func TestOwnerPayloadIsTheSmallestOwnerLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		peers []*peer
		want  int64
	}{
		{"no peers", nil, 0},
		{"only older peers", []*peer{{m: Member{ID: "a"}}, {m: Member{ID: "b"}}}, 0},
		{"smallest owner", []*peer{{m: Member{ID: "a"}, maxPayload: 16 << 10}, {m: Member{ID: "b"}, maxPayload: 8 << 10}, {m: Member{ID: "c"}}}, 8 << 10},
		{"client-only ignored", []*peer{{m: Member{ID: "a"}, maxPayload: 16 << 10}, {m: Member{ID: "b", ClientOnly: true}, maxPayload: 4 << 10}}, 16 << 10},
		{"only client-only", []*peer{{m: Member{ID: "b", ClientOnly: true}, maxPayload: 4 << 10}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := &Node{}
			n.members.peers = map[string]*peer{}
			n.members.peerPayload.Store(1) // stale: recomputed, not kept
			for _, p := range tc.peers {
				n.members.peers[p.m.ID] = p
			}
			n.ownerPayload()
			require.Equal(t, tc.want, n.members.peerPayload.Load())
		})
	}
}
