package pubsub_test

import (
	"context"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// heteroCluster starts 3 servers and one node per server, "p", "o" and "s"
// (indexes 0, 1, 2: publisher, owner, subscriber), node i joined with fast
// followed by opts[i], as in a rolling configuration change, and waits for
// the views to converge.
func heteroCluster(t *testing.T, opts [3][]pubsub.Option) *testcluster.Cluster {
	t.Helper()
	return heteroNodes(t, testcluster.New(t, 3, 0), opts)
}

// heteroNodes adds heteroCluster's nodes to c, a cluster of 3 servers.
func heteroNodes(t *testing.T, c *testcluster.Cluster, opts [3][]pubsub.Option) *testcluster.Cluster {
	t.Helper()
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
// still sees 2 of 3 and keeps serving. It lost its quorum instead (3 of 3
// runs; the publish refused NOT_READY): KeepServing members sent no stable
// views in their heartbeats, so it never counted them. Every node now
// tracks and reports stable views; only KeepMajority ones act on them, and
// a KeepServing node logs nothing about them.
func TestMixedPartitionPolicyKeepsTheMajorityThroughOneCrash(t *testing.T) {
	leakcheck.Parallel(t)
	logs := &syncBuffer{}
	c := heteroCluster(t, [3][]pubsub.Option{{warnLogger(logs)}, {pubsub.WithPartitionPolicy(pubsub.KeepMajority)}, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	rec := newRecorder()
	subscribe(t, c.Nodes[0], topic, rec.handler)
	lost := countQuorumLosses(t, []*pubsub.Node{c.Nodes[1]})
	c.Crash(2)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[1], "s") }, "s still in o's view")
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)
	require.True(t, c.Nodes[1].Stats().HasQuorum, "o sees 2 of 3 but has no quorum")
	require.Zero(t, lost.Load(), "o lost its quorum on the way")
	require.NotContains(t, logs.String(), "partition policy:", "the KeepServing node logged about stable views")
}

// TestMixedPartitionPolicyTwoKeepMajorityKeepTheMajorityThroughOneCrash:
// the reverse stage of the rolling change, two nodes of three on
// KeepMajority and one on KeepServing. When a KeepMajority member crashes,
// the other counts the KeepServing one and keeps its quorum (it lost it
// before the KeepServing node reported stable views).
func TestMixedPartitionPolicyTwoKeepMajorityKeepTheMajorityThroughOneCrash(t *testing.T) {
	leakcheck.Parallel(t)
	km := pubsub.WithPartitionPolicy(pubsub.KeepMajority)
	c := heteroCluster(t, [3][]pubsub.Option{{km}, {km}, nil})
	topic := topicOwnedByEveryView(t, c, "o")
	rec := newRecorder()
	subscribe(t, c.Nodes[2], topic, rec.handler)
	lost := countQuorumLosses(t, []*pubsub.Node{c.Nodes[1]})
	c.Crash(0)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[1], "p") }, "p still in o's view")
	ack, err := c.Nodes[2].Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)
	require.True(t, c.Nodes[1].Stats().HasQuorum, "o sees 2 of 3 but has no quorum")
	require.Zero(t, lost.Load(), "o lost its quorum on the way")
}

// TestMixedPartitionPolicyKeepServingNodeIsolatedByARouteCut: the
// KeepServing node "s" is cut off (every route of its server). It keeps
// serving on its own (it owns every topic there, never NOT_READY, and logs
// nothing about stable views), and the other side, whose KeepMajority
// nodes count its KeepServing member, keeps serving too; after the heal
// every node serves every topic.
func TestMixedPartitionPolicyKeepServingNodeIsolatedByARouteCut(t *testing.T) {
	leakcheck.Parallel(t)
	km := pubsub.WithPartitionPolicy(pubsub.KeepMajority)
	for _, tc := range []struct {
		name string
		p, o []pubsub.Option
	}{
		{"one KeepMajority", nil, []pubsub.Option{km}},
		{"two KeepMajority", []pubsub.Option{km}, []pubsub.Option{km}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &syncBuffer{}
			c := heteroNodes(t, testcluster.NewFaulty(t, 3, 0), [3][]pubsub.Option{tc.p, tc.o, {warnLogger(logs)}})
			p, o, s := c.Nodes[0], c.Nodes[1], c.Nodes[2]
			oTopic, sTopic := topicOwnedByEveryView(t, c, "o"), topicOwnedByEveryView(t, c, "s")
			rec := newRecorder()
			for _, topic := range []string{oTopic, sTopic} {
				subscribe(t, p, topic, rec.handler)
				subscribe(t, s, topic, rec.handler)
			}
			lost := countQuorumLosses(t, []*pubsub.Node{p, o})
			isolateServer(c, 2)
			waitViews(t, []*pubsub.Node{p, o}, []*pubsub.Node{s})
			for i, topic := range []string{oTopic, sTopic} {
				ack, err := s.Publish(ctxT(t), topic, msg(i))
				mustAccept(t, ack, err, 1) // s's own subscriber
				ack, err = p.Publish(ctxT(t), topic, msg(i))
				mustAccept(t, ack, err, 1) // p's
			}
			require.True(t, o.Stats().HasQuorum, "o sees 2 of 3 but has no quorum: %s", quorumOf(c.Nodes))
			require.True(t, p.Stats().HasQuorum, "p: %s", quorumOf(c.Nodes))
			require.Zero(t, lost.Load(), "the majority side lost its quorum")
			healAndServe(t, c)
			require.NotContains(t, logs.String(), "partition policy:", "the KeepServing node logged about stable views")
		})
	}
}

// warnLogger logs warnings and errors to logs.
func warnLogger(logs *syncBuffer) pubsub.Option {
	return pubsub.WithLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
}
