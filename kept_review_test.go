package pubsub_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A copy dropped from the store (oldest first, past its bounds) while its
// delivery and a later one's are on their way: the older batch is answered
// NOT_KEPT and sent again with its messages, a round trip after the later
// batch, which its copy served at once. The publisher's own subscriber must
// still get every batch, in order, and stay subscribed.
func TestKeptCopyMissDoesNotLetALaterBatchOvertakeIt(t *testing.T) {
	c := newCluster(t, 3, 3)
	pub := c.Nodes[0]
	topic := ownedTopic(t, pub, "n1", "kept-overtake")
	rec := newRecorder()
	var subs []*pubsub.Subscription
	for _, n := range c.Nodes {
		subs = append(subs, subscribe(t, n, topic, rec.handler))
	}
	const batches, size = 30, 10
	// Room for about one batch's copy: each new one drops the one before,
	// whose delivery may not have come yet.
	pub.LimitKeptCopiesForTest(size * 15 * 3 / 2)
	ctx := ctxT(t)
	// Several callers at once, so that deliveries of several batches are
	// on their way together; each caller's batches in its own order.
	const callers = 4
	wants := make([][]string, callers)
	var want []string
	for g := range callers {
		for b := range batches {
			for i := range size {
				wants[g] = append(wants[g], fmt.Sprintf("%d-%s", g, msg(b*size+i)))
			}
		}
		want = append(want, wants[g]...)
	}
	var wg sync.WaitGroup
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				msgs := make([]pubsub.Outgoing, size)
				for i := range msgs {
					msgs[i].Data = []byte(wants[g][b*size+i])
				}
				ack, err := pub.PublishMessages(ctx, topic, msgs, pubsub.WithAck(pubsub.AckAccepted))
				assert.NoError(t, err)
				assert.Equal(t, pubsub.Accepted, ack.Status)
			}
		}()
	}
	wg.Wait()
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		return len(rec.of(subs[1].ID())) == len(want) && len(rec.of(subs[2].ID())) == len(want)
	}, "the other nodes' subscribers got %d and %d of %d", len(rec.of(subs[1].ID())), len(rec.of(subs[2].ID())), len(want))
	// The publisher's subscriber: everything, within the same few seconds.
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(rec.of(subs[0].ID())) >= len(want) },
		"the publisher's own subscriber got %d of %d", len(rec.of(subs[0].ID())), len(want))
	st := pub.Stats()
	t.Logf("publisher: %d hits, %d misses", st.KeptCopyHits, st.KeptCopyMisses)
	got := rec.of(subs[0].ID())
	assert.ElementsMatch(t, want, got, "the publisher's own subscriber got %d of %d", len(got), len(want))
	for g := range callers {
		var mine []string
		for _, m := range got {
			if strings.HasPrefix(m, fmt.Sprint(g, "-")) {
				mine = append(mine, m)
			}
		}
		assert.IsIncreasing(t, mine, "caller %d's messages", g)
	}
	assert.Zero(t, c.Nodes[1].Stats().Evictions, "evictions by the owner")
}

// The publisher's node has more subscribers than one delivery can list
// beside the batch, so the owner sends it the batch in parts. None names
// the copy: the first part would take it, and the others, answered
// NOT_KEPT and sent again with the messages, could arrive after the
// owner's later batches (they did, before, as misses). Every subscriber
// there gets every batch, and none is evicted.
func TestKeptCopyWithTheSubscriberListInParts(t *testing.T) {
	nodes := mixedPayloadCluster(t, []int32{8 << 10, 8 << 10, 8 << 10}, nil)
	pub := nodes[0]
	topic := ownedTopic(t, pub, "h1", "kept-parts")
	ctx := ctxT(t)
	var mu sync.Mutex
	got := map[pubsub.SubscriberID][]string{}
	h := func(ctx context.Context, m *pubsub.Message) error {
		id, _ := pubsub.SubscriberFromContext(ctx)
		mu.Lock()
		got[id] = append(got[id], string(m.Data))
		mu.Unlock()
		return nil
	}
	const perNode = 150
	var subs []*pubsub.Subscription
	for range perNode {
		s, err := pub.Subscribe(ctx, topic, h)
		require.NoError(t, err)
		subs = append(subs, s)
	}
	other := subscribe(t, nodes[2], topic, h)
	// Batches of one message near the largest: little room for the list.
	size := pub.MaxMessageSize() - 512
	const callers, batches = 2, 15
	var wg sync.WaitGroup
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				data := []byte(fmt.Sprintf("%d-%s", g, msg(b)))
				data = append(data, make([]byte, size-len(data))...)
				ack, err := pub.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: data}}, pubsub.WithAck(pubsub.AckAccepted))
				assert.NoError(t, err)
				assert.Equal(t, pubsub.Accepted, ack.Status)
			}
		}()
	}
	wg.Wait()
	count := func(id pubsub.SubscriberID) int {
		mu.Lock()
		defer mu.Unlock()
		return len(got[id])
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return count(other.ID()) == callers*batches },
		"the other node's subscriber got %d of %d", count(other.ID()), callers*batches)
	short := func() (k int) {
		for _, s := range subs {
			if count(s.ID()) != callers*batches {
				k++
			}
		}
		return k
	}
	testcluster.WaitFor(t, 5*time.Second, func() bool { return short() == 0 }, "%d of the publisher's subscribers missed batches", short())
	st := pub.Stats()
	assert.Zero(t, st.KeptCopyHits+st.KeptCopyMisses, "a delivery in parts names no copy")
	assert.Zero(t, nodes[1].Stats().Evictions, "evictions by the owner")
}
