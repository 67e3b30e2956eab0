package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// joinResult is what a Join run in the background returned, with the
// members it had at that moment.
type joinResult struct {
	node    *pubsub.Node
	members []string
	err     error
	took    time.Duration
}

// joinInBackground joins a node with id on nc and sends the result.
func joinInBackground(ctx context.Context, nc *nats.Conn, id string, opts ...pubsub.Option) <-chan joinResult {
	done := make(chan joinResult, 1)
	go func() {
		start := time.Now()
		n, err := pubsub.Join(ctx, nc, append([]pubsub.Option{pubsub.WithNodeID(id)}, opts...)...)
		r := joinResult{node: n, err: err, took: time.Since(start)}
		if n != nil {
			for _, m := range n.Members() {
				r.members = append(r.members, m.ID)
			}
		}
		done <- r
	}()
	return done
}

// A member that answers late (its connection stalled: on a loaded machine,
// a member busy for longer than the joiner's quiet period) must not make a
// joiner conclude it is alone: it would serve every topic by itself, its
// subscribers' publishes reaching none of the cluster's subscribers, until
// heartbeats merged the views. The member's subscription to the members
// subject, known to the joiner's server through the route, tells the
// joiner someone is there, so Join waits for its answer.
func TestJoinWaitsForASlowMemberInsteadOfJoiningAlone(t *testing.T) {
	opts := []pubsub.Option{pubsub.WithHeartbeatInterval(50 * time.Millisecond), pubsub.WithMemberTimeout(4 * time.Second)}
	c := testcluster.NewFaulty(t, 2, 0)
	c.AddNode(t, "n0", 1, opts...)
	c.Client(0).Stall(faultnet.Both) // n0 hears nothing and says nothing

	nc := c.Connect(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := joinInBackground(ctx, nc, "late", opts...)
	// Ten quiet periods (50 ms each): long past the point where a joiner
	// that took silence for no member returned alone.
	select {
	case r := <-done:
		if r.node != nil {
			defer func() { require.NoError(t, r.node.Close(ctxT(t))) }()
		}
		t.Fatalf("Join returned while the only member could not answer: err %v, members %v after %v", r.err, r.members, r.took)
	case <-time.After(500 * time.Millisecond):
	}
	c.Client(0).Heal()
	select {
	case r := <-done:
		require.NoError(t, r.err)
		defer func() { require.NoError(t, r.node.Close(ctxT(t))) }()
		assert.ElementsMatch(t, []string{"n0", "late"}, r.members, "Join returned without the member that answered late")
	case <-time.After(15 * time.Second):
		t.Fatal("Join never returned after the member could answer again")
	}
}

// With no other connection subscribed to the members subject, a lone node
// needs no answer: it joins after its quiet period, not MemberTimeout.
// With one (here a tool watching the subject, which never answers) it
// cannot tell that subscriber from a slow member, so it waits up to
// MemberTimeout and then joins alone; a Join ctx ending first fails
// saying why.
func TestLoneJoinWaitsOnlyWhenSomeoneSubscribesToTheMembersSubject(t *testing.T) {
	const memberTimeout = 3 * time.Second
	opts := []pubsub.Option{pubsub.WithHeartbeatInterval(50 * time.Millisecond), pubsub.WithMemberTimeout(memberTimeout)}
	c := testcluster.New(t, 1, 0)

	r := <-joinInBackground(ctxT(t), c.Connect(t, 0), "alone", opts...)
	require.NoError(t, r.err)
	require.NoError(t, r.node.Close(ctxT(t)))
	assert.Equal(t, []string{"alone"}, r.members)
	assert.Less(t, r.took, memberTimeout/2, "a lone node with nobody on the members subject waited for answers")

	watcher := c.Connect(t, 0)
	sub, err := watcher.SubscribeSync("pubsub.members")
	require.NoError(t, err)
	defer func() { _ = sub.Unsubscribe() }()
	require.NoError(t, watcher.Flush())

	r = <-joinInBackground(ctxT(t), c.Connect(t, 0), "watched", opts...)
	require.NoError(t, r.err)
	require.NoError(t, r.node.Close(ctxT(t)))
	assert.Equal(t, []string{"watched"}, r.members)
	assert.GreaterOrEqual(t, r.took, memberTimeout, "a lone node returned before MemberTimeout though the members subject had a subscriber")

	short, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	r = <-joinInBackground(short, c.Connect(t, 0), "hurried", opts...)
	require.Error(t, r.err)
	assert.Nil(t, r.node)
	assert.ErrorIs(t, r.err, context.DeadlineExceeded)
	assert.Contains(t, r.err.Error(), "no member had answered")
	assert.Contains(t, r.err.Error(), "give its ctx that long")
}

// A member draining its Close keeps its subscription to the members
// subject but must not answer a JOIN as a member (the joiner would add
// it): it answers with its LEAVE, so a node joining as the last member
// closes (a restart overlapping the old node's drain) does not take its
// subscription for a slow member and wait out MemberTimeout.
func TestJoinDoesNotWaitForAMemberThatIsLeaving(t *testing.T) {
	const memberTimeout = 4 * time.Second
	opts := []pubsub.Option{pubsub.WithHeartbeatInterval(50 * time.Millisecond), pubsub.WithMemberTimeout(memberTimeout)}
	c := testcluster.New(t, 1, 0)
	leaver := c.AddNode(t, "leaver", 0, opts...)
	// A handler that blocks holds the leaver's Close in its drain.
	block, running := make(chan struct{}), make(chan struct{}, 1)
	_, err := leaver.Subscribe(ctxT(t), "drained", func(context.Context, *pubsub.Message) error {
		running <- struct{}{}
		<-block
		return nil
	})
	require.NoError(t, err)
	published := make(chan error, 1)
	go func() {
		_, err := leaver.Publish(context.Background(), "drained", []byte("x"))
		published <- err
	}()
	<-running

	closed := closeUntilItLeaves(t, c, leaver) // the watcher is gone: not an audience of its own

	r := <-joinInBackground(ctxT(t), c.Connect(t, 0), "next", opts...)
	close(block)
	require.NoError(t, <-closed)
	require.NoError(t, <-published)
	require.NoError(t, r.err)
	defer func() { require.NoError(t, r.node.Close(ctxT(t))) }()
	assert.Equal(t, []string{"next"}, r.members, "the joiner added the member that was leaving")
	assert.Less(t, r.took, memberTimeout/2, "Join waited for the answer of a member that was leaving")
}

// closeUntilItLeaves starts n.Close and returns once n announced its
// LEAVE (its drain has begun), with the channel Close's result arrives
// on. The subscription that watched for the LEAVE is gone by then.
func closeUntilItLeaves(t *testing.T, c *testcluster.Cluster, n *pubsub.Node) <-chan error {
	t.Helper()
	watcher := c.Connect(t, 0)
	beats, err := watcher.SubscribeSync("pubsub.members")
	require.NoError(t, err)
	require.NoError(t, watcher.Flush())
	closed := make(chan error, 1)
	go func() { closed <- n.Close(context.Background()) }()
	for leaving := false; !leaving; {
		m, err := beats.NextMsg(10 * time.Second)
		require.NoError(t, err, "%s never announced its LEAVE", n.ID())
		var env wire.Envelope
		require.NoError(t, proto.Unmarshal(m.Data, &env))
		leaving = env.GetHeartbeat().GetKind() == wire.Heartbeat_LEAVE && env.GetHeartbeat().GetFrom().GetNodeId() == n.ID()
	}
	require.NoError(t, beats.Unsubscribe())
	require.NoError(t, watcher.Flush())
	return closed
}
