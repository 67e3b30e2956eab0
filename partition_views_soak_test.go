//go:build soak

package pubsub_test

// Behind the soak tag since stop 27: at 42 s (three cases of ~14 s, most
// of it watching) it was the longest test of the default suite, which
// must stay under 10 minutes under -race on 2 cores. Run it with
//
//	go test -race -tags soak -run TestSoakKeepMajorityCutStaysClosedThroughViewChanges -v .

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Found in review: the disagreement was timed from the last change of
// either view, so any change anywhere (a joiner, a crash, client-only tools
// coming and going) restarted it, and the two nodes behind a cut counted
// the third and both served again for the grace, or all along under churn
// (92-94% of the time). It is now timed without a break.
func TestSoakKeepMajorityCutStaysClosedThroughViewChanges(t *testing.T) {
	t.Run("a joiner", func(t *testing.T) {
		c := cutBetweenTwoOfThree(t)
		n0, n1 := c.Nodes[0], c.Nodes[1]
		stop := watchServingTogether(t, n0, n1)
		tool := joinClientOnly(t, c, 2, "tool")
		testcluster.WaitFor(t, 2*time.Second, func() bool { return len(n0.Members()) == 3 && len(n1.Members()) == 3 }, "n0 or n1 never saw the joiner")
		time.Sleep(2 * time.Second) // watching: the property must hold for this long after the change
		require.Zero(t, stop(), "n0 and n1 served together after a join: %s", quorumOf(c.Nodes))
		requireBothReject(t, n0, n1)
		require.NoError(t, tool.Close(ctxT(t)))
		healAndServe(t, c)
	})
	t.Run("client-only churn", func(t *testing.T) {
		c := cutBetweenTwoOfThree(t)
		n0, n1 := c.Nodes[0], c.Nodes[1]
		stop := watchServingTogether(t, n0, n1)
		var wg sync.WaitGroup
		errs := make(chan error, 6)
		for i := range 6 { // a tool joins every 300 ms, and leaves once its Join returns
			nc := c.Connect(t, 2)
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				tool, err := pubsub.Join(ctx, nc, append(keepMajorityOpts(), pubsub.WithClientOnly(), pubsub.WithNodeID(fmt.Sprintf("tool%d", i)))...)
				if err == nil {
					err = tool.Close(ctx)
				}
				errs <- err
			})
			time.Sleep(300 * time.Millisecond) // pacing the churn, not synchronisation
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Zero(t, stop(), "n0 and n1 served together while client-only members came and went: %s", quorumOf(c.Nodes))
		requireBothReject(t, n0, n1)
		healAndServe(t, c)
	})
	t.Run("a crash, five nodes", func(t *testing.T) {
		c := testcluster.NewFaulty(t, 5, 5, keepMajorityOpts()...)
		c.WaitConverged(t, 10*time.Second)
		n := c.Nodes
		waitStableEverywhere(t, n, 5)
		c.Route(0, 1).Cut()
		waitSees(t, n[0], n[0], n[2], n[3], n[4])
		waitSees(t, n[1], n[1], n[2], n[3], n[4])
		testcluster.WaitFor(t, 3*time.Second, func() bool { return !n[0].Stats().HasQuorum && !n[1].Stats().HasQuorum },
			"n0 or n1 still serves: %s", quorumOf(n))
		stop := watchServingTogether(t, n[0], n[1])
		c.Crash(4)
		waitSees(t, n[0], n[0], n[2], n[3])
		waitSees(t, n[1], n[1], n[2], n[3])
		time.Sleep(2 * time.Second) // watching: the property must hold for this long after the change
		require.Zero(t, stop(), "n0 and n1 served together after a crash: %s", quorumOf(n[:4]))
		requireBothReject(t, n[0], n[1])
	})
}

// joinClientOnly joins a client-only node named id on server s of c, while
// views may disagree (Join then returns at its MemberTimeout deadline).
func joinClientOnly(t *testing.T, c *testcluster.Cluster, s int, id string) *pubsub.Node {
	t.Helper()
	nc := c.Connect(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := pubsub.Join(ctx, nc, append(keepMajorityOpts(), pubsub.WithClientOnly(), pubsub.WithNodeID(id))...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = n.Close(context.Background()) })
	return n
}

// watchServingTogether samples, until the returned stop is called, whether
// a and b serve at the same time; stop returns in how many samples they did.
func watchServingTogether(t *testing.T, a, b *pubsub.Node) (stop func() int) {
	return countSamples(t, func() bool { return a.Stats().HasQuorum && b.Stats().HasQuorum })
}

// requireBothReject publishes to a topic each of a and b owns in its own
// view: neither may accept.
func requireBothReject(t *testing.T, a, b *pubsub.Node) {
	t.Helper()
	topic := ownedByBoth(t, a, b)
	for _, n := range []*pubsub.Node{a, b} {
		_, err := n.Publish(ctxT(t), topic, []byte("x"))
		require.ErrorIs(t, err, pubsub.ErrTopicUnavailable, "%s accepted a publish to %s, which %s and %s both own", n.ID(), topic, a.ID(), b.ID())
	}
}
