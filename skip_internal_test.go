package pubsub

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// skipped leaves out exactly the subscribers a split batch's later chunk
// names, on their own node only.
func TestSkippedLeavesOutOnlyTheNamedSubscribers(t *testing.T) {
	locals := []string{"a", "b", "c"}
	set := skipSet([]*wire.Failure{{Node: "n1", Local: "b"}, {Node: "n2", Local: "a"}})
	for _, tc := range []struct {
		name string
		node string
		skip map[SubscriberID]struct{}
		want []string
	}{
		{"nothing to skip", "n1", nil, locals},
		{"one on this node", "n1", set, []string{"a", "c"}},
		{"one named on another node", "n2", set, []string{"b", "c"}},
		{"none of this node", "n3", set, locals},
		{"all", "n1", skipSet([]*wire.Failure{{Node: "n1", Local: "a"}, {Node: "n1", Local: "b"}, {Node: "n1", Local: "c"}}), []string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, skipped(tc.node, locals, tc.skip))
		})
	}
	assert.Equal(t, []string{"a", "b", "c"}, locals, "the node's own list is never changed")
}

// A publisher names at most wire.MaxSkip subscribers, within its byte
// budget, and never a group's member.
func TestChunkSkipListIsBounded(t *testing.T) {
	var c chunkAcks
	c.ack.Failures = append(c.ack.Failures, DeliveryFailure{Subscriber: SubscriberID{Node: "n0", Local: "m@g"}, Group: "g", Status: HandlerError})
	for i := range 300 {
		c.ack.Failures = append(c.ack.Failures, DeliveryFailure{Subscriber: SubscriberID{Node: "n1", Local: fmt.Sprintf("s%03d", i)}, Status: HandlerError})
	}
	all := c.skip(1 << 20)
	assert.Len(t, all, wire.MaxSkip)
	assert.Equal(t, "s000", all[0].GetLocal(), "the group member is left out, not counted")
	assert.Len(t, c.skip(3*(2+4+8)), 3, "a byte budget of three entries")
	assert.Empty(t, c.skip(0))
}
