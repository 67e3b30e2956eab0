package pubsub

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

// Regression (review): a graceful Close waited for its in-flight batches
// before sending the LEAVE. Meanwhile every publish to any topic the
// leaving node owns was answered CLOSED and could not move to the new owner
// (the LEAVE was not out), so one slow subscriber on one topic stalled
// publishes to all of its topics for up to SubscriberTimeout. The LEAVE
// goes first: such a publish moves within milliseconds.
func TestGracefulCloseDoesNotHoldBackTheLeaveForASlowBatch(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(3*time.Second), WithSubscriberTimeout(2*time.Second))
	topics := ownedTopics(pub, "owner", "s", 2)
	slow, other := topics[0], topics[1]
	release := holdDeliveries(t, pub, slow)
	_, closed := publishHeldThenClose(t, owner, pub, slow)
	waitForTest(t, "the drain began", owner.life.drain.on.Load)

	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := pub.Publish(context.Background(), other, []byte("unrelated topic"))
		done <- err
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(time.Second):
		t.Fatalf("a publish to another topic of the leaving node waited %v (and counting) behind one slow batch: the LEAVE is held back", time.Since(start))
	}
	release()
	require.NoError(t, <-closed)
}

func joinWithForTest(t *testing.T, url, id string, opts ...Option) *Node {
	t.Helper()
	nc, err := nats.Connect(url)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := Join(ctx, nc, append([]Option{WithNodeID(id)}, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Close(ctx)
	})
	return n
}

// Regression (review): Close stops the heartbeats; when it then waited up
// to SubscriberTimeout + RequestTimeout for its in-flight batches before
// the LEAVE (5 s + 5 s by default, more than MemberTimeout's 3 s), a batch
// held by a slow subscriber made every peer time the leaver out as crashed
// before its LEAVE went out: no handover, and the publisher of the batch
// gave up on an owner that left its view. The LEAVE goes first, and the
// publisher keeps waiting for a gracefully leaving owner's answer
// (ownerAnswers). Scaled down: MemberTimeout 1 s, SubscriberTimeout and
// RequestTimeout 4 s.
func TestGracefulCloseLeavesBeforeMemberTimeout(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second),
		WithRequestTimeout(4*time.Second), WithSubscriberTimeout(4*time.Second))
	topic := ownedTopics(pub, "owner", "m", 1)[0]
	ownerGone := func() bool { _, ok := pub.view().member("owner"); return !ok }
	// The handler takes as long as it takes the publisher's node to drop
	// the owner (bounded by its ctx, SubscriberTimeout).
	_, err := pub.Subscribe(t.Context(), topic, func(ctx context.Context, _ *Message) error {
		for !ownerGone() && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond) // a slow handler's work, polling
		}
		return nil
	})
	require.NoError(t, err)
	published, closed := publishHeldThenClose(t, owner, pub, topic)
	waitForTest(t, "the publisher's node drops the owner", ownerGone)
	assert.True(t, leftGracefully(pub, owner), "the owner was timed out as crashed before its LEAVE went out")
	require.NoError(t, <-published, "the publish in flight at the leaving owner")
	require.NoError(t, <-closed)
}

// Regression (review): a publisher keeps waiting for an owner that left
// gracefully (ownerAnswers: it still answers what it took) while its LEAVE
// repeats. When the leaver died while draining, nothing swept the
// publisher's call again (sweeps ran only on view changes), so it waited
// out RequestTimeout. Scaled down: MemberTimeout 1 s, RequestTimeout and
// SubscriberTimeout 30 s.
func TestPublisherStopsWaitingForALeaverThatDiedDraining(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second),
		WithRequestTimeout(30*time.Second), WithSubscriberTimeout(30*time.Second))
	topic := ownedTopics(pub, "owner", "d", 1)[0]
	holdDeliveries(t, pub, topic)
	published, closed := publishHeldThenClose(t, owner, pub, topic)
	waitForTest(t, "the publisher's node sees the LEAVE", func() bool { return leftGracefully(pub, owner) })
	left := time.Now()
	owner.nc.Close() // the leaver dies while draining: it will never answer
	select {
	case err := <-published:
		require.ErrorIs(t, err, ErrTimeout, "the outcome of a publish whose owner died is unknown")
		assert.GreaterOrEqual(t, time.Since(left), 900*time.Millisecond, "gave up on a gracefully leaving owner before MemberTimeout")
	case <-time.After(10 * time.Second):
		t.Fatalf("the publisher still waits %v after its owner left and died (MemberTimeout 1 s)", time.Since(left))
	}
	select {
	case <-closed: // whatever it says of a connection closed underneath it
	case <-time.After(5 * time.Second):
		t.Fatal("Close still drains a node whose connection is closed (its ctx: 20 s)")
	}
}

// publishHeldThenClose publishes to topic from pub, waits until the batch
// is in flight at owner (a handler holds it), then starts owner's Close
// with 20 s to finish. It returns the publish's and Close's outcomes.
func publishHeldThenClose(t *testing.T, owner, pub *Node, topic string) (published, closed chan error) {
	t.Helper()
	published, closed = make(chan error, 1), make(chan error, 1)
	go func() {
		_, err := pub.Publish(context.Background(), topic, []byte("held"))
		published <- err
	}()
	waitForTest(t, "the batch in flight at the owner", func() bool { return owner.owner.inflight.Load() == 1 })
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		closed <- owner.Close(ctx)
	}()
	return published, closed
}

// The counterpart (review): a leaver that drains longer than MemberTimeout
// (a handler taking 2.5 s, MemberTimeout 1 s) is still alive, repeats its
// LEAVE, and answers: its publisher must get the answer, not ErrTimeout
// once MemberTimeout passed after the first LEAVE.
func TestPublisherWaitsForALeaverDrainingPastMemberTimeout(t *testing.T) {
	leakcheck.Parallel(t)
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(time.Second),
		WithRequestTimeout(30*time.Second), WithSubscriberTimeout(30*time.Second))
	topic := ownedTopics(pub, "owner", "slow", 1)[0]
	const handling = 2500 * time.Millisecond
	_, err := pub.Subscribe(t.Context(), topic, func(ctx context.Context, _ *Message) error {
		select { // a slow handler's work
		case <-time.After(handling):
		case <-ctx.Done():
		}
		return nil
	})
	require.NoError(t, err)
	published, closed := publishHeldThenClose(t, owner, pub, topic)
	requireAnsweredByLeaver(t, published, closed)
}

// leftGracefully reports whether n recorded leaver's graceful leave.
func leftGracefully(n, leaver *Node) bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	_, ok := n.members.left[incarnation{leaver.self.ID, leaver.self.Incarnation}]
	return ok
}

// Regression (review): graceful leaves were remembered per node ID, so a
// new incarnation's LEAVE (here a restart under the ID that fails its Join
// because the old incarnation still drains; a forgery does the same)
// replaced the draining one's. Its repeated LEAVEs were then ignored and
// its publishers gave up on it MemberTimeout later, while it still
// answered. Leaves are remembered per incarnation.
func TestPublisherWaitsForALeaverWhileItsIDRejoins(t *testing.T) {
	opts := []Option{WithHeartbeatInterval(50 * time.Millisecond), WithMemberTimeout(time.Second),
		WithRequestTimeout(30 * time.Second), WithSubscriberTimeout(30 * time.Second)}
	owner, pub := ownerAndPublisher(t, opts...)
	topic := ownedTopics(pub, "owner", "rejoin", 1)[0]
	release := holdDeliveries(t, pub, topic)
	published, closed := publishHeldThenClose(t, owner, pub, topic)
	waitForTest(t, "the publisher's node sees the LEAVE", func() bool { return leftGracefully(pub, owner) })

	nc, err := nats.Connect(owner.nc.ConnectedUrl())
	require.NoError(t, err)
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = Join(ctx, nc, append([]Option{WithNodeID("owner")}, opts...)...)
	require.ErrorIs(t, err, ErrInvalidConfig, "a second live node with the ID")
	// The failed Join's LEAVE has gone out. The old incarnation keeps
	// draining for longer than MemberTimeout, then answers.
	timer := time.AfterFunc(1500*time.Millisecond, release)
	defer timer.Stop()
	requireAnsweredByLeaver(t, published, closed)
}

// holdDeliveries subscribes on n to topic with a handler that holds every
// batch until release is called (or the test ends, or its ctx does).
func holdDeliveries(t *testing.T, n *Node, topic string) (release func()) {
	t.Helper()
	held := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release)
	_, err := n.Subscribe(t.Context(), topic, func(ctx context.Context, _ *Message) error {
		select {
		case <-held:
		case <-ctx.Done():
		}
		return nil
	})
	require.NoError(t, err)
	return release
}

// requireAnsweredByLeaver asserts that a publish held at a leaving owner was
// answered, and that the owner's Close returned without error.
func requireAnsweredByLeaver(t *testing.T, published, closed chan error) {
	t.Helper()
	select {
	case err := <-published:
		require.NoError(t, err, "the publisher gave up on a leaver that was still draining")
	case <-time.After(20 * time.Second):
		t.Fatal("the publish never returned")
	}
	require.NoError(t, <-closed)
}
