package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A member that crashed shortly before a node joins is still in its
// peers' views, and their join replies list it. Counted as heard at the
// join, it made the joiner wait for its view until Join's deadline
// (MemberTimeout) and keep it up to MemberTimeout after its peers dropped
// it. Listed with how long its peers have not heard it, it times out at
// the joiner when it does at the others: Join returns once they agree
// without it, well before the deadline.
func TestJoinerAfterACrashDropsTheCrashedMemberWithItsPeers(t *testing.T) {
	c := newCluster(t, 3, 3)
	crashed := c.Nodes[2].ID()
	c.Crash(2)
	// Timing is the point: join while the others still hold the crashed
	// member, about 800 ms before their MemberTimeout (2 s) drops it.
	time.Sleep(1200 * time.Millisecond)
	require.Len(t, c.Nodes[0].Members(), 3, "the peers dropped the crashed member before the join: the test needs it listed")
	logs := &logLines{}
	start := time.Now()
	j := c.AddNode(t, "j", 0, append(append([]pubsub.Option{}, fast...), pubsub.WithLogger(slog.New(logs)))...)
	took := time.Since(start)
	t.Logf("Join took %v", took)
	assert.Empty(t, logs.matching("joined before views converged"), "Join waited for the crashed member until its deadline")
	ids := func(n *pubsub.Node) []string {
		var out []string
		for _, m := range n.Members() {
			out = append(out, m.ID)
		}
		return out
	}
	assert.NotContains(t, ids(j), crashed, "the joiner still holds the crashed member when Join returns")
	assert.Equal(t, ids(c.Nodes[0]), ids(j), "Join returned into a view its peers do not share")
	assert.Less(t, took, 2*time.Second, "Join waited out its MemberTimeout deadline")
}

// A node refused by members whose views hold MaxMembers got nil from Join
// once its deadline passed: nobody had it in their view, and its requests
// were refused until they timed out. The refusal travels in the join
// replies: Join fails with ErrInvalidConfig naming MaxMembers, and the
// members keep serving without it.
func TestJoinRefusedByFullViewsFailsNamingMaxMembers(t *testing.T) {
	opts := []pubsub.Option{pubsub.WithMaxMembers(2)}
	c := newCluster(t, 3, 2, opts...)
	nc := c.Connect(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := pubsub.Join(ctx, nc, append(append([]pubsub.Option{pubsub.WithNodeID("third")}, fast...), opts...)...)
	if n != nil {
		_ = n.Close(context.Background())
	}
	require.Error(t, err, "Join returned nil though every member refused it")
	assert.True(t, errors.Is(err, pubsub.ErrInvalidConfig), "want ErrInvalidConfig, got %v", err)
	assert.Contains(t, err.Error(), "MaxMembers (2)")
	assert.NotErrorIs(t, err, context.DeadlineExceeded)
	for _, m := range c.Nodes {
		assert.False(t, slices.ContainsFunc(m.Members(), func(m pubsub.Member) bool { return m.ID == "third" }), "%s holds the refused node", m.ID())
	}
	topic := ownedBy(t, c.Nodes[1], "after-refusal")
	rec := newRecorder()
	subscribe(t, c.Nodes[0], topic, rec.handler)
	subscribe(t, c.Nodes[1], topic, rec.handler)
	publishUntilAccepted(t, c.Nodes[0], topic, []byte("x"), 2, 3*time.Second)
}

// Room made as the joiner's deadline comes lets the refused node in. A
// replacement joining a full cluster right after a member crashed is
// refused until the others' MemberTimeout drops the crashed one, about
// when its own Join deadline comes: it asks again then, and only a refusal
// that still stands fails it.
func TestJoinRightAfterACrashInAFullClusterSucceeds(t *testing.T) {
	opts := []pubsub.Option{pubsub.WithMaxMembers(3)}
	// The members' MemberTimeout is 200 ms longer than the joiner's: their
	// room comes after its deadline, as when their sweep runs late on a
	// loaded machine. Asked again over a grace of a quarter of its own
	// MemberTimeout, the joiner gets in.
	c := newCluster(t, 3, 3, append(slices.Clone(opts), pubsub.WithMemberTimeout(2200*time.Millisecond))...)
	c.Crash(2)
	start := time.Now()
	j := c.AddNode(t, "j", 1, append(append([]pubsub.Option{}, fast...), opts...)...)
	assert.Greater(t, time.Since(start), 2*time.Second, "Join returned before its deadline: the refusal was not asked again")
	assert.Positive(t, c.Nodes[0].Stats().MembersRejected+c.Nodes[1].Stats().MembersRejected, "no member refused the joiner: the test needs a refusal")
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		return len(j.Members()) == 3 && len(c.Nodes[0].Members()) == 3 && len(c.Nodes[1].Members()) == 3 &&
			slices.ContainsFunc(c.Nodes[0].Members(), func(m pubsub.Member) bool { return m.ID == "j" })
	}, "views never took the joiner in: %v / %v", j.Members(), c.Nodes[0].Members())
}

// One member answering a JOIN with a refusal, while the others take the
// joiner in, does not fail the Join: a forged reply (or a member with a
// lower MaxMembers) cannot keep nodes out of a cluster that has room.
func TestForgedJoinRefusalDoesNotFailJoin(t *testing.T) {
	c := newCluster(t, 1, 2)
	refused := refuseEveryJoin(t, c)
	j := c.AddNode(t, "j", 0, fast...)
	assert.Positive(t, refused.Load(), "the forger answered no JOIN")
	assert.True(t, slices.ContainsFunc(c.Nodes[0].Members(), func(m pubsub.Member) bool { return m.ID == "j" }), "n0 never took the joiner in")
	assert.NotNil(t, j)
}

// Nor does it fail the first node's Join, which no member answers: only
// members heard beating count as refusing.
func TestForgedJoinRefusalDoesNotFailTheFirstJoin(t *testing.T) {
	c := testcluster.New(t, 1, 0)
	refused := refuseEveryJoin(t, c)
	c.AddNode(t, "first", 0, fast...)
	assert.Positive(t, refused.Load(), "the forger answered no JOIN")
}

// A connection closed while Join waits for the views to agree stops the
// node (the heartbeat loop notices), but Join went on waiting until its
// MemberTimeout deadline before failing. It fails at once with ErrClosed.
func TestJoinFailsSoonWhenItsConnectionClosesWhileJoining(t *testing.T) {
	c := newCluster(t, 1, 1)
	// A member that never reports the joiner's view keeps Join waiting
	// for agreement until its deadline.
	stop := heartbeatAs(c.Connect(t, 0), "never-agrees")
	defer stop()
	testcluster.WaitFor(t, 5*time.Second, func() bool {
		return slices.ContainsFunc(c.Nodes[0].Members(), func(m pubsub.Member) bool { return m.ID == "never-agrees" })
	}, "n0 never heard the member that never agrees")
	const memberTimeout = 8 * time.Second
	// A joiner that joined alone before the close (rare since Join waits
	// for an answer while members subscribe: membersAudience) would not
	// reach the case: it leaves, and another one joins.
	for attempt := range 5 {
		id := fmt.Sprintf("j%d", attempt)
		nc, err := nats.Connect(c.Servers.URL(0))
		require.NoError(t, err)
		type joined struct {
			n   *pubsub.Node
			err error
		}
		done := make(chan joined, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			n, err := pubsub.Join(ctx, nc, pubsub.WithNodeID(id), pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(memberTimeout))
			done <- joined{n, err}
		}()
		// The member heard the JOIN: Join is running.
		testcluster.WaitFor(t, 5*time.Second, func() bool {
			return slices.ContainsFunc(c.Nodes[0].Members(), func(m pubsub.Member) bool { return m.ID == id })
		}, "the joiner's JOIN never arrived")
		select {
		case r := <-done:
			require.NoError(t, r.err, "Join failed before its connection closed")
			t.Logf("%s joined before the close, alone (%d members): trying again", id, len(r.n.Members()))
			require.NoError(t, r.n.Close(ctxT(t)))
			nc.Close()
			continue
		default:
		}
		closed := time.Now()
		nc.Close()
		select {
		case r := <-done:
			took := time.Since(closed)
			if r.n != nil {
				_ = r.n.Close(context.Background())
				require.Len(t, r.n.Members(), 1, "Join returned on a closed connection with peers: it did not wait for them to agree")
				t.Logf("%s joined alone just before the close: trying again", id)
				continue
			}
			require.Error(t, r.err)
			assert.ErrorIs(t, r.err, pubsub.ErrClosed)
			assert.Less(t, took, memberTimeout/2, "Join waited for its deadline on a closed connection")
			return
		case <-time.After(2 * memberTimeout):
			t.Fatal("Join never returned after its connection closed")
		}
	}
	t.Fatal("every joiner joined alone before its connection closed: the case was never reached")
}

// refuseEveryJoin answers every JOIN on server 0 as a member named
// "forger" whose view is full, and counts the answers.
func refuseEveryJoin(t *testing.T, c *testcluster.Cluster) *atomic.Int64 {
	t.Helper()
	forger := c.Connect(t, 0)
	refuse, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_JOIN_REPLY, From: &wire.MemberRef{NodeId: "forger", Incarnation: 1}, ViewId: 12345, RefusedMaxMembers: 7}}})
	require.NoError(t, err)
	var refused atomic.Int64
	sub, err := forger.Subscribe("pubsub.members", func(m *nats.Msg) {
		if m.Reply != "" && forger.Publish(m.Reply, refuse) == nil {
			refused.Add(1)
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, forger.Flush())
	return &refused
}
