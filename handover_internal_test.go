package pubsub

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Copies of one member's handover request queue as one job, and past
// maxHandoverAsks the oldest copy is pushed out (to be answered
// incomplete), not the newest: four forged copies sent ahead of the
// member's own request must not get it refused.
func TestHandoverQueueKeepsTheNewestCopies(t *testing.T) {
	var d drainState
	d.start()
	d.serving = maxSyncPullers // every server busy: requests wait
	v := newView(1, []Member{{ID: "a"}})
	for i := range maxHandoverAsks {
		start, dropped := d.enqueue("a", handoverAsk{v: v, reply: fmt.Sprint("forged-", i)})
		require.False(t, start)
		require.Empty(t, dropped, "copy %d pushed one out", i)
	}
	_, dropped := d.enqueue("a", handoverAsk{v: v, reply: "own"})
	assert.Equal(t, "forged-0", dropped, "the oldest copy goes")
	_, dropped = d.enqueue("b", handoverAsk{v: v, reply: "b"})
	assert.Empty(t, dropped)
	require.Len(t, d.queued, 2, "one job per member")
	asks := d.queued[0].asks
	require.Len(t, asks, maxHandoverAsks)
	assert.Equal(t, "own", asks[len(asks)-1].reply, "the member's own request is served")
}

// Regression (review): a copy of a member's handover request that arrived
// while the first waited for a server was answered incomplete, so a
// retry, or a forged request naming the member sent just before it, left
// the member asking every member instead. Every copy gets the handover.
func TestHandoverAnswersEveryCopyOfARequest(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond))
	topic := ownedTopics(pub, "owner", "h", 1)[0]
	sub, err := pub.Subscribe(t.Context(), topic, func(_ context.Context, _ *Message) error { return nil })
	require.NoError(t, err)

	nc, err := nats.Connect(owner.nc.ConnectedUrl())
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	replies := make([]*nats.Subscription, maxHandoverAsks+1) // the first is pushed out by the last
	for i := range replies {
		replies[i], err = nc.SubscribeSync(nats.NewInbox())
		require.NoError(t, err)
	}
	require.NoError(t, nc.Flush())

	// The owner drains with every handover server busy, so the copies wait.
	owner.life.drain.start()
	owner.life.drain.mu.Lock()
	owner.life.drain.serving = maxSyncPullers
	owner.life.drain.mu.Unlock()
	me, ok := owner.view().member("pub")
	require.True(t, ok)
	after := newView(owner.view().epoch+1, []Member{me}) // the requester's view without the leaver
	for _, r := range replies {
		owner.serveHandover(after, "pub", r.Subject)
	}
	// One of the busy servers (counted in serving) gets to the queue.
	owner.life.goroutines.add()
	go owner.serveHandovers()

	for i, r := range replies {
		m, err := r.NextMsg(5 * time.Second)
		require.NoError(t, err, "copy %d of the request got no answer", i)
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(m.Data, &env))
		page := env.GetReply().GetSync()
		require.NotNil(t, page, "copy %d", i)
		if i == 0 { // pushed out: told at once, so its requester asks every member
			assert.True(t, page.GetIncomplete(), "the copy pushed out was not answered incomplete")
			continue
		}
		assert.False(t, page.GetIncomplete(), "copy %d was answered incomplete", i)
		require.Len(t, page.GetTopics(), 1, "copy %d", i)
		assert.Equal(t, topic, page.GetTopics()[0].GetTopic())
		assert.Equal(t, []string{sub.ID().Local}, page.GetTopics()[0].GetSubscribers())
	}
	// The copies named one view: the topics' owners were worked out once,
	// for it (ownersUnder), not per copy.
	owner.life.drain.mu.Lock()
	defer owner.life.drain.mu.Unlock()
	require.Len(t, owner.life.drain.owners, 1)
	assert.Equal(t, []string{topic}, owner.life.drain.owners[0].by["pub"], "the handover did not use the owners worked out per view")
}

// A leaving node works out which member owns each of its topics once per
// view its peers name (they usually name the same one), not once per
// member asking: a leave in a 48-node cluster walked every topic 47 times.
// Views are told apart by their members, and only a few are kept.
func TestHandoverTopicOwnersOncePerView(t *testing.T) {
	var d drainState
	d.start()
	topics := []string{"t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"}
	walks := 0
	names := func() []string { walks++; return topics }
	members := []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 1}, {ID: "c", Incarnation: 1}}
	v := newView(1, members)
	by := d.ownersUnder(v, 0, names)
	got := 0
	for id, ts := range by {
		for _, tp := range ts {
			assert.Equal(t, id, v.ownerOf(tp).ID, "topic %s listed under the wrong member", tp)
			got++
		}
	}
	assert.Equal(t, len(topics), got, "every topic listed once")
	same := newView(7, slices.Clone(members)) // another epoch, the same members
	assert.Equal(t, by, d.ownersUnder(same, 0, names))
	assert.Equal(t, 1, walks, "the same members: topics walked again")

	const others = maxOwnerViews + 2
	for i := range others {
		other := newView(1, append(slices.Clone(members), Member{ID: fmt.Sprint("x", i), Incarnation: 1}))
		d.ownersUnder(other, 0, names)
		d.ownersUnder(other, 0, names)
	}
	assert.Len(t, d.owners, maxOwnerViews, "views kept past the bound")
	kept := maxOwnerViews - 1 // beside the first view
	assert.Equal(t, 1+kept+2*(others-kept), walks, "views past the bound are walked for each request, the others once")

	// The registry changed meanwhile (a reset or a resync: topics may have
	// become pending): the first view's topics are listed again, once.
	before := walks
	d.ownersUnder(v, 1, names)
	d.ownersUnder(v, 1, names)
	assert.Equal(t, before+1, walks, "a view's topics walked again after the registry changed")
}

// A leaver's handover covers a topic whose synced subscribers no actor took
// yet (gained, and named by no request since), and says it is incomplete
// while the leaver's own registry is: it listed only the topics with an
// actor, and its requester, trusting it, served such a topic without its
// subscribers (found by review).
func TestHandoverCoversSyncedTopicsWithoutAnActor(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond))
	topic := ownedTopics(pub, "owner", "pending", 1)[0]
	sub, err := pub.Subscribe(t.Context(), topic, func(_ context.Context, _ *Message) error { return nil })
	require.NoError(t, err)
	// The owner holds the subscriber as a synced one no actor took.
	o := &owner.owner
	o.mu.Lock()
	a := o.topics[topic]
	delete(o.topics, topic)
	o.mu.Unlock()
	require.NotNil(t, a)
	o.registry.mu.Lock()
	o.registry.subs[topic] = map[string]map[string]struct{}{"pub": {sub.ID().Local: {}}}
	o.registry.mu.Unlock()
	complete, _ := o.registry.completeGen()
	require.True(t, complete)

	me, ok := owner.view().member("pub")
	require.True(t, ok)
	after := newView(owner.view().epoch+1, []Member{me}) // the requester's view without the leaver
	page := owner.handoverFor(after, "pub")
	assert.False(t, page.GetIncomplete())
	require.Len(t, page.GetTopics(), 1, "the topic pending in the registry is handed over")
	assert.Equal(t, topic, page.GetTopics()[0].GetTopic())
	assert.Equal(t, []string{sub.ID().Local}, page.GetTopics()[0].GetSubscribers())

	o.registry.mu.Lock()
	o.registry.complete = false
	o.registry.mu.Unlock()
	assert.True(t, owner.handoverFor(newView(after.epoch+1, []Member{me}), "pub").GetIncomplete(),
		"a leaver whose registry is not complete hands over an incomplete page")
}
