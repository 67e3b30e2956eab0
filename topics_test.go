package pubsub_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

func noop(context.Context, *pubsub.Message) error { return nil }

func TestTopicsListsEveryTopicWithItsSubscribersAcrossNodes(t *testing.T) {
	c := newCluster(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	ctx := ctxT(t)
	subscribe(t, c.Nodes[0], "orders", noop)
	subscribe(t, c.Nodes[0], "orders", noop)
	subscribe(t, c.Nodes[2], "orders", noop)
	for _, i := range []int{1, 2} {
		_, err := c.Nodes[i].Subscribe(ctx, "jobs", noop, pubsub.WithGroup("workers"))
		require.NoError(t, err)
	}
	subscribe(t, c.Nodes[0], "jobs", noop)
	gone := subscribe(t, c.Nodes[1], "gone", noop)
	require.NoError(t, gone.Unsubscribe(ctx))

	for _, asker := range c.Nodes {
		got, err := asker.Topics(ctx)
		require.NoError(t, err, "asked of %s", asker.ID())
		ordersOwner, err := asker.OwnerOf("orders")
		require.NoError(t, err)
		jobsOwner, err := asker.OwnerOf("jobs")
		require.NoError(t, err)
		assert.Equal(t, []pubsub.TopicInfo{
			{Topic: "jobs", Owner: jobsOwner.ID, Subscribers: 3, Groups: map[string]int{"workers": 2}},
			{Topic: "orders", Owner: ordersOwner.ID, Subscribers: 3},
		}, got, "asked of %s", asker.ID())
	}
}

// A member whose connection died is still in the view until MemberTimeout:
// Topics returns the others' topics and an error naming it.
func TestTopicsReportsMembersThatDoNotAnswer(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	subscribe(t, c.Nodes[1], "kept", noop)
	subscribe(t, c.Nodes[2], "lost", noop)
	c.Crash(2)
	got, err := c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTimeout)
	assert.Contains(t, err.Error(), "member n2")
	assert.Contains(t, err.Error(), "1 of 3 members did not answer in full")
	require.Len(t, got, 1)
	assert.Equal(t, "kept", got[0].Topic)

	require.NoError(t, c.Nodes[0].Close(ctxT(t)))
	_, err = c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrClosed)
}

// smallPayloadPair is two nodes on one server whose max_payload is 4 kB.
func smallPayloadPair(t *testing.T) []*pubsub.Node {
	srv, err := embedded.StartServerWith(func(o *server.Options) { o.MaxPayload = 4096 })
	require.NoError(t, err)
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	var nodes []*pubsub.Node
	for i := range 2 {
		nc, err := nats.Connect(srv.ClientURL())
		require.NoError(t, err)
		t.Cleanup(nc.Close)
		n, err := pubsub.Join(ctxT(t), nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID(fmt.Sprintf("p%d", i)))...)
		require.NoError(t, err)
		t.Cleanup(func() { _ = n.Close(context.Background()) })
		nodes = append(nodes, n)
	}
	return nodes
}

// A member with more topics than fit one NATS message answers in pages.
func TestTopicsPagesThroughMaxPayload(t *testing.T) {
	nodes := smallPayloadPair(t)
	const topics = 400 // about 40 bytes each: 16 kB, four pages or more
	for i := range topics {
		subscribe(t, nodes[1], fmt.Sprintf("a-topic-with-a-rather-long-name-%04d", i), noop)
	}
	got, err := nodes[0].Topics(ctxT(t))
	require.NoError(t, err)
	require.Len(t, got, topics)
	for i, ti := range got {
		assert.Equal(t, fmt.Sprintf("a-topic-with-a-rather-long-name-%04d", i), ti.Topic)
		assert.Equal(t, 1, ti.Subscribers)
	}
}

// Found in review: a topic whose summary alone did not fit one NATS message
// (many consumer groups) made its member's page unsendable: the asker
// waited out RequestTimeout and lost that member's later topics.
func TestTopicsListsATopicWithMoreGroupsThanFitOneMessage(t *testing.T) {
	nodes := smallPayloadPair(t)
	ctx := ctxT(t)
	subscribe(t, nodes[1], "a-small", noop)
	for g := range 150 { // about 40 bytes each: 6 kB of groups
		_, err := nodes[1].Subscribe(ctx, "big", noop, pubsub.WithGroup(fmt.Sprintf("a-consumer-group-name-%04d", g)))
		require.NoError(t, err)
	}
	subscribe(t, nodes[1], "c-after", noop)
	got, err := nodes[0].Topics(ctx)
	require.NoError(t, err)
	require.Len(t, got, 3)
	assert.Equal(t, []string{"a-small", "big", "c-after"}, []string{got[0].Topic, got[1].Topic, got[2].Topic})
	big := got[1]
	assert.Equal(t, 150, big.Subscribers, "every subscription counts")
	assert.True(t, big.GroupsTruncated)
	assert.NotEmpty(t, big.Groups)
	assert.Less(t, len(big.Groups), 150)
	assert.False(t, got[0].GroupsTruncated)
}

// forgedLister puts a forged client-only member id in c's view, on server
// 0, answering TopicsRequests with pages of 2000 topics named
// <id>-<page>-<i> (pages that always advance), without end when total is 0,
// else up to total topics.
func forgedLister(t *testing.T, c *testcluster.Cluster, id string, total int) {
	raw := c.Connect(t, 0)
	ref := &wire.MemberRef{NodeId: id, Incarnation: 1, ClientOnly: true}
	var pages atomic.Int64
	_, err := raw.Subscribe(natsutil.NodeSubject(natsutil.DefaultPrefix, id), func(m *nats.Msg) {
		var env wire.Envelope
		if proto.Unmarshal(m.Data, &env) != nil || env.GetTopics() == nil {
			return
		}
		page := pages.Add(1)
		rep := &wire.Reply{Code: wire.Reply_OK, More: total == 0 || int(page)*2000 < total}
		for i := range 2000 {
			rep.Topics = append(rep.Topics, &wire.TopicSummary{Topic: fmt.Sprintf("%s-%06d-%04d", id, page, i), Subscribers: 1})
		}
		data, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: rep}})
		_ = m.Respond(data)
	})
	require.NoError(t, err)
	beat, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{From: ref}}})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() })
	wg.Go(func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			_ = raw.Publish(natsutil.DefaultPrefix+".members", beat)
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	})
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		_, in := slices.BinarySearchFunc(c.Nodes[0].Members(), id, func(m pubsub.Member, id string) int { return strings.Compare(m.ID, id) })
		return in
	}, "the forged member %s never joined the view", id)
}

// Found in review: a member answering page after page (here a forged
// client-only member in the view) kept Topics paging, and growing, until
// its ctx ended. It now fails past maxTopicsListed and contributes
// nothing.
func TestTopicsFromAMemberThatNeverStopsIsBounded(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 1, fast...)
	subscribe(t, c.Nodes[0], "real", noop)
	forgedLister(t, c, "ghost", 0)
	got, err := c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTooLarge)
	assert.Contains(t, err.Error(), "member ghost")
	require.Len(t, got, 1, "the forged member contributes nothing")
	assert.Equal(t, "real", got[0].Topic)
}

// Several members each under the per-member bound cannot take the listing
// past it either: the one whose topics would is failed and left out.
func TestTopicsListingIsBoundedAcrossMembers(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 1, 1, fast...)
	subscribe(t, c.Nodes[0], "real", noop)
	forgedLister(t, c, "ghost-a", 150_000)
	forgedLister(t, c, "ghost-b", 150_000)
	got, err := c.Nodes[0].Topics(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrTooLarge)
	assert.Contains(t, err.Error(), "1 of 3 members did not answer in full")
	assert.Len(t, got, 150_001, "this node's topic and one forged member's")
}
