package pubsub_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// TestForgedDeliveryAheadOfItsOwnerEvictsAGroupMember is
// TestForgedDeliveryAheadOfItsOwnerEvictsTheSubscription for a node that
// holds only a group member and gets its share of a batch from another
// publisher: the owner packs that share straight into the send, and the
// send lost its first-send flag there, so the member's OutOfOrder never
// told the owner the mark was forged: never evicted, it dropped every
// later share it was given (found by review).
func TestForgedDeliveryAheadOfItsOwnerEvictsAGroupMember(t *testing.T) {
	c := newCluster(t, 1, 3)
	topic := ownedBy(t, c.Nodes[0], "wedge-group")
	rec := newRecorder()
	s, err := c.Nodes[1].Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
	require.NoError(t, err)
	forgeAhead(t, c, topic, func(d *wire.DeliverBatch) { d.Seq += 3 })
	// A second member on the owner: node 1 gets a share, not the batch.
	_, err = c.Nodes[0].Subscribe(ctxT(t), topic, rec.handler, pubsub.WithGroup("g"))
	require.NoError(t, err)

	batch := [][]byte{msg(1), msg(2), msg(3), msg(4)}
	_, err = c.Nodes[2].PublishBatch(ctxT(t), topic, batch)
	require.NoError(t, err)
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the group member whose mark was forged ahead was not ended")
	}
	require.ErrorIs(t, s.Err(), pubsub.ErrEvicted)
	require.Contains(t, s.Err().Error(), "out-of-order")
}
