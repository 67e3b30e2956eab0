package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// incarnationOf returns the incarnation of member id in n's view, or 0.
func incarnationOf(n *pubsub.Node, id string) uint64 {
	for _, m := range n.Members() {
		if m.ID == id {
			return m.Incarnation
		}
	}
	return 0
}

// stopEvents returns a channel that receives n's NodeStopped event.
func stopEvents(t *testing.T, n *pubsub.Node) <-chan pubsub.NodeStopped {
	stopped := make(chan pubsub.NodeStopped, 1)
	cancel := n.Events().Subscribe(func(e pubsub.Event) {
		if s, ok := e.(pubsub.NodeStopped); ok {
			select {
			case stopped <- s:
			default:
			}
		}
	})
	t.Cleanup(cancel)
	return stopped
}

// A live node whose sends alone are stalled (it hears its peers, they do
// not hear it) while a joiner with its ID beats briefly and crashes: the
// peers took the joiner in its place (the node was quiet to them), the node
// saw them report so (replaced.go: noteReplacedView), then the peers
// dropped the crashed joiner and, not hearing the node, reported a view
// without the ID at all. That report is neither this node's view nor the
// replaced one, so the old "replaced since" stayed. A later duplicate's
// single heartbeat then stopped the node at its next tick, as if the peers
// had served that one for MemberTimeout, although it beat once and died:
// once the stall healed, nobody held the ID. The node must run on and its
// peers take it back.
func TestStaleReplacedReportDoesNotLetALaterDuplicateStopTheNode(t *testing.T) {
	leakcheck.Parallel(t)
	opts := []pubsub.Option{
		pubsub.WithHeartbeatInterval(50 * time.Millisecond),
		pubsub.WithMemberTimeout(time.Second),
		pubsub.WithRequestTimeout(3 * time.Second),
		pubsub.WithSubscriberTimeout(2 * time.Second),
	}
	c := testcluster.NewFaulty(t, 3, 3, opts...)
	c.WaitConverged(t, 10*time.Second)
	live := c.Nodes[2]
	stopped := stopEvents(t, live)
	inc := incarnationOf(live, "n2")
	require.NotZero(t, inc)
	serve := func(want uint64) bool {
		return incarnationOf(c.Nodes[0], "n2") == want && incarnationOf(c.Nodes[1], "n2") == want
	}
	running := func() {
		t.Helper()
		select {
		case e := <-stopped:
			t.Fatalf("the live node stopped: %v; peers' view %v", e.Err, c.Nodes[0].Members())
		default:
		}
	}

	c.Client(2).Stall(faultnet.Forward)
	first := inc + 1
	c.ForgeMembers(t, 0, testcluster.HeartbeatBytes(testcluster.KindJoin, "n2", first, 0))
	beat := time.NewTicker(50 * time.Millisecond)
	defer beat.Stop()
	for !serve(first) {
		<-beat.C
		c.ForgeMembers(t, 0, testcluster.HeartbeatBytes(testcluster.KindHeartbeat, "n2", first, 0))
	}
	// A few more beats, so the live node hears its peers report the joiner
	// in its place; then the joiner crashes.
	for range 6 {
		<-beat.C
		c.ForgeMembers(t, 0, testcluster.HeartbeatBytes(testcluster.KindHeartbeat, "n2", first, 0))
	}
	testcluster.WaitFor(t, 5*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") },
		"the peers did not drop the crashed joiner")
	running()

	// A later duplicate beats once.
	c.ForgeMembers(t, 0, testcluster.HeartbeatBytes(testcluster.KindJoin, "n2", inc+2, 0))
	select {
	case e := <-stopped:
		t.Fatalf("a duplicate that beat once stopped the live node at once: %v", e.Err)
	case <-time.After(time.Second + 300*time.Millisecond):
	}
	c.HealAll()
	testcluster.WaitFor(t, 5*time.Second, func() bool { return serve(inc) }, "the peers did not take the live node back: %v", c.Nodes[0].Members())
	running()
}

// An older incarnation whose JOIN reaches the peers only after a newer one
// with its ID finished joining (its routes to them stalled meanwhile): the
// peers serve the newer one and ignore the older one's heartbeats as stale.
// The older node must not run on silently: its Join fails, or it stops
// with NodeStopped and its subscriptions end with an error wrapping
// ErrClosed. The newer one runs on.
func TestOlderIncarnationJoiningAfterANewerOneIsToldLoudly(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 2, fast...) // n0 on server 0, n1 on server 1
	c.WaitConverged(t, 10*time.Second)
	c.StallRoute(2, 0)
	c.StallRoute(2, 1)
	watch := c.Connect(t, 2)
	joins := make(chan *nats.Msg, 256)
	ws, err := watch.ChanSubscribe(c.Prefix()+".members", joins)
	require.NoError(t, err)
	require.NoError(t, watch.Flush())

	type joined struct {
		n   *pubsub.Node
		err error
		at  time.Time
	}
	res := make(chan joined, 1)
	nc := c.Connect(t, 2)
	start := time.Now()
	go func() {
		n, err := pubsub.Join(context.Background(), nc, append(fast, pubsub.WithNodeID("dup"))...)
		res <- joined{n, err, time.Now()}
	}()
	// The older one announced itself (on its own server only).
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		select {
		case m := <-joins:
			var env wire.Envelope
			return proto.Unmarshal(m.Data, &env) == nil && env.GetHeartbeat().GetKind() == wire.Heartbeat_JOIN &&
				env.GetHeartbeat().GetFrom().GetNodeId() == "dup"
		default:
			return false
		}
	}, "the older node sent no JOIN")
	require.NoError(t, ws.Unsubscribe())
	newer := c.AddNode(t, "dup", 0, fast...)
	c.HealAll()

	var older joined
	select {
	case older = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("the older node's Join did not return")
	}
	t.Logf("older's Join returned after %v: %v", older.at.Sub(start), older.err)
	if older.err != nil {
		require.ErrorIs(t, older.err, pubsub.ErrInvalidConfig)
	} else {
		defer func() { _ = older.n.Close(ctxT(t)) }()
		stopped := stopEvents(t, older.n)
		sub, err := older.n.Subscribe(ctxT(t), "older", func(context.Context, *pubsub.Message) error { return nil })
		if err == nil {
			select {
			case <-sub.Done():
			case <-time.After(3 * 2 * time.Second):
				t.Fatalf("the older node still runs %v after its Join returned; its view %v, peers' %v", 3*2*time.Second, older.n.Members(), c.Nodes[0].Members())
			}
			t.Logf("older stopped %v after its Join returned: %v", time.Since(older.at), sub.Err())
			require.ErrorIs(t, sub.Err(), pubsub.ErrClosed)
			require.ErrorContains(t, sub.Err(), "another node joined with its ID")
		} else {
			require.ErrorIs(t, err, pubsub.ErrClosed)
		}
		select {
		case e := <-stopped:
			require.ErrorIs(t, e.Err, pubsub.ErrClosed)
		case <-time.After(time.Second):
			// Stopped before the subscription to events: the error above
			// said why.
		}
	}
	ni := incarnationOf(newer, "dup")
	require.True(t, incarnationOf(c.Nodes[0], "dup") == ni && incarnationOf(c.Nodes[1], "dup") == ni, "the peers do not serve the newer node: %v", c.Nodes[0].Members())
	_, err = newer.Publish(ctxT(t), "newer", []byte("x"))
	require.NoError(t, err, "the newer node")
}
