package pubsub_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// heteroCluster starts 3 servers and one node per server, "p", "o" and "s"
// (indexes 0, 1, 2: publisher, owner, subscriber), node i joined with fast
// followed by opts[i], as in a rolling configuration change, and waits for
// the views to converge.
func heteroCluster(t *testing.T, opts [3][]pubsub.Option) *testcluster.Cluster {
	t.Helper()
	c := testcluster.New(t, 3, 0)
	for i, id := range []string{"p", "o", "s"} {
		c.AddNode(t, id, i, append(append([]pubsub.Option{}, fast...), opts[i]...)...)
	}
	c.WaitConverged(t, 10*time.Second)
	return c
}

// topicOwnedByEveryView returns a topic every node's view gives to owner.
func topicOwnedByEveryView(t *testing.T, c *testcluster.Cluster, owner string) string {
	t.Helper()
	for i := range 10_000 {
		topic := "hetero-" + strconv.Itoa(i)
		all := true
		for _, n := range c.Nodes {
			if o, err := n.OwnerOf(topic); err != nil || o.ID != owner {
				all = false
				break
			}
		}
		if all {
			return topic
		}
	}
	t.Fatalf("no topic owned by %s", owner)
	return ""
}

// TestSubscriberNodeWithALongerSubscriberTimeoutThanTheOwner: the owner
// waits for a subscriber node's report about its own SubscriberTimeout (+
// RequestTimeout/2). Before the owner said its SubscriberTimeout in the
// delivery, a node with a longer one reported too late: the healthy
// subscriber beside a blocked one on that node was listed as Timeout in
// every ack, and the blocked one, an unreported node's Timeout never
// counting, was never evicted (6 of 6 publishes, 3 of 3 runs). Now the
// shorter of the two timeouts applies on the subscriber's node.
func TestSubscriberNodeWithALongerSubscriberTimeoutThanTheOwner(t *testing.T) {
	c := heteroCluster(t, [3][]pubsub.Option{
		nil,
		{pubsub.WithSubscriberTimeout(200 * time.Millisecond), pubsub.WithRequestTimeout(400 * time.Millisecond), pubsub.WithEvictAfter(2)},
		{pubsub.WithEvictAfter(2)}, // fast: SubscriberTimeout 2s
	})
	topic := topicOwnedByEveryView(t, c, "o")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // runs before the cluster's cleanup
	slow := subscribe(t, c.Nodes[2], topic, func(context.Context, *pubsub.Message) error { <-release; return nil })
	rec := newRecorder()
	healthy := []pubsub.SubscriberID{subscribe(t, c.Nodes[0], topic, rec.handler).ID(), subscribe(t, c.Nodes[2], topic, rec.handler).ID()}
	for i := range 2 {
		start := time.Now()
		ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		require.NoError(t, err)
		require.Less(t, time.Since(start), time.Second, "publish %d waited past the owner's SubscriberTimeout", i)
		require.Equal(t, pubsub.Accepted, ack.Status)
		require.Equal(t, 2, ack.Delivered, "publish %d: ack %+v", i, ack)
		require.Len(t, ack.Failures, 1, "publish %d: ack %+v", i, ack)
		require.Equal(t, slow.ID(), ack.Failures[0].Subscriber)
		require.Equal(t, pubsub.Timeout, ack.Failures[0].Status)
		for _, id := range healthy {
			require.Equal(t, []string{string(msg(i))}, rec.of(id)[i:], "subscriber %s", id)
		}
	}
	testcluster.WaitFor(t, 2*time.Second, func() bool {
		select {
		case <-slow.Done():
			return true
		default:
			return false
		}
	}, "blocked subscriber not evicted after EvictAfter (2) timeouts")
	require.ErrorIs(t, slow.Err(), pubsub.ErrEvicted)
}

// TestMixedPartitionPolicyKeepsTheMajorityThroughOneCrash: one node of three
// runs KeepMajority, the others KeepServing (a rolling change of the
// policy). After one KeepServing member crashes, the KeepMajority node
// still sees 2 of 3 and should keep serving. It loses its quorum instead:
// KeepServing members send no stable views in their heartbeats, so the
// KeepMajority node never counts them as agreeing (fails 2 of 2; the same
// crash with every node on KeepMajority keeps the quorum, 1 of 1); the publish is refused NOT_READY. Neither refused
// at Join nor logged beyond "quorum changed".
func TestMixedPartitionPolicyKeepsTheMajorityThroughOneCrash(t *testing.T) {
	t.Skip("known defect: a KeepMajority node among KeepServing ones loses its quorum on one crash of three; needs KeepServing nodes to report views as KeepMajority ones do, or Join to refuse/log a mixed policy")
	c := heteroCluster(t, [3][]pubsub.Option{nil, {pubsub.WithPartitionPolicy(pubsub.KeepMajority)}, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	rec := newRecorder()
	subscribe(t, c.Nodes[0], topic, rec.handler)
	c.Crash(2)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[1], "s") }, "s still in o's view")
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)
	require.True(t, c.Nodes[1].Stats().HasQuorum, "o sees 2 of 3 but has no quorum")
}
