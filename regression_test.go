package pubsub_test

// Regression tests for the fault-handling findings that need no network
// fault: each names the finding it guards.

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Finding 6a: a subscriber that joins between two chunks of a split batch
// got only part of it, so it must not count as delivered.
func TestSplitBatchAckCountsOnlySubscribersOfEveryChunk(t *testing.T) {
	c := newCluster(t, 1, 1)
	node := c.Nodes[0]
	size := node.MaxMessageSize() * 2 / 5 // two fit in one chunk, not three
	batch := [][]byte{bytes.Repeat([]byte("A"), size), bytes.Repeat([]byte("B"), size), bytes.Repeat([]byte("C"), size)}
	late := newRecorder()
	var lateSub *pubsub.Subscription
	var subErr error
	first := subscribe(t, node, "split-join", func(ctx context.Context, m *pubsub.Message) error {
		if m.Data[0] == 'B' { // the last message of the first chunk
			lateSub, subErr = node.Subscribe(context.Background(), "split-join", late.handler)
		}
		return nil
	})
	ack, err := node.PublishBatch(ctxT(t), "split-join", batch)
	require.NoError(t, err)
	require.NoError(t, subErr)
	got := late.of(lateSub.ID())
	require.Len(t, got, 1, "the late subscriber gets only the last chunk")
	assert.Equal(t, byte('C'), got[0][0])
	assert.Equal(t, 1, ack.Delivered, "only %v got the whole batch; ack %+v", first.ID(), ack)
	assert.Empty(t, ack.Failures)
	assert.Equal(t, 3, ack.Messages)
}

// A subscriber stops a batch at its first failure; a batch split into
// chunks for MaxMessageSize too: a failing handler ran again on every
// later chunk, and with the default EvictAfter (3) one PublishBatch of 4
// chunks evicted it (found by a probe of events and stats). Failing
// subscribers on the owner's node and on another, beside one that runs
// everything.
func TestSplitBatchStopsAtASubscribersFirstFailure(t *testing.T) {
	c := newCluster(t, 1, 2)
	owner, pub := c.Nodes[0], c.Nodes[1]
	topic := ownedBy(t, owner, "split-fail")
	var runs [2]atomic.Int32
	failing := func(i int) pubsub.Handler {
		return func(context.Context, *pubsub.Message) error {
			runs[i].Add(1)
			return fmt.Errorf("failing subscriber %d", i)
		}
	}
	bad := []*pubsub.Subscription{subscribe(t, owner, topic, failing(0)), subscribe(t, pub, topic, failing(1))}
	good := newRecorder()
	goodSub := subscribe(t, pub, topic, good.handler)
	big := bytes.Repeat([]byte("x"), pub.MaxMessageSize()/2+1) // one per chunk
	ack, err := pub.PublishBatch(ctxT(t), topic, [][]byte{big, big, big, big})
	require.NoError(t, err)
	assert.Equal(t, 1, ack.Delivered, "ack %+v", ack)
	require.Len(t, ack.Failures, 2, "ack %+v", ack)
	for _, f := range ack.Failures {
		assert.Equal(t, pubsub.HandlerError, f.Status)
	}
	assert.Len(t, good.of(goodSub.ID()), 4, "the good subscriber gets every chunk")
	for i, s := range bad {
		assert.Equal(t, int32(1), runs[i].Load(), "failing subscriber %d ran more than the first message of the batch", i)
		select {
		case <-s.Done():
			t.Errorf("one PublishBatch evicted failing subscriber %d: %v", i, s.Err())
		default:
		}
	}
}

// Finding 6b: Close with a publish in flight must not claim the publish was
// not taken: its outcome is unknown.
func TestCloseWithPublishInFlightReportsTimeout(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "inflight")
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	subscribe(t, c.Nodes[2], topic, func(ctx context.Context, m *pubsub.Message) error {
		select {
		case started <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	defer close(release)
	type result struct {
		ack pubsub.PublishAck
		err error
	}
	done := make(chan result, 1)
	go func() {
		ack, err := c.Nodes[0].Publish(context.Background(), topic, []byte("x"))
		done <- result{ack, err}
	}()
	<-started // the subscriber is processing it
	c.CloseNode(t, 0)
	res := <-done
	require.Error(t, res.err)
	assert.Equal(t, pubsub.ReasonTimeout, res.ack.Reason, "err %v", res.err)
	assert.ErrorIs(t, res.err, pubsub.ErrTimeout)
	assert.NotErrorIs(t, res.err, pubsub.ErrClosed)
}

// Finding 6c: a node whose connection is closed underneath it stops: it ends
// its subscriptions, emits NodeStopped, and fails calls with ErrClosed.
func TestNodeStopsWhenItsConnectionCloses(t *testing.T) {
	c := newCluster(t, 1, 2)
	node := c.Nodes[0]
	stopped := make(chan pubsub.NodeStopped, 1)
	cancel := node.Events().Subscribe(func(e pubsub.Event) {
		if s, ok := e.(pubsub.NodeStopped); ok {
			stopped <- s
		}
	})
	defer cancel()
	sub := subscribe(t, node, "zombie", func(context.Context, *pubsub.Message) error { return nil })
	c.Crash(0) // closes the node's connection without Close
	select {
	case <-sub.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("subscription still active 5 s after the connection closed")
	}
	require.ErrorIs(t, sub.Err(), pubsub.ErrClosed)
	select {
	case e := <-stopped:
		assert.Equal(t, node.ID(), e.Node)
		assert.ErrorIs(t, e.Err, pubsub.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("no NodeStopped event")
	}
	ack, err := node.Publish(ctxT(t), "zombie", []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrClosed)
	assert.Equal(t, pubsub.ReasonClosed, ack.Reason)
	_, err = node.Subscribe(ctxT(t), "zombie", func(context.Context, *pubsub.Message) error { return nil })
	require.ErrorIs(t, err, pubsub.ErrClosed)
	require.NoError(t, node.Close(ctxT(t)))
}

// Finding 6c: a request on a closed connection wraps ErrClosed, not a bare
// nats error.
func TestPublishOnClosedConnectionWrapsErrClosed(t *testing.T) {
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[1], "closed-conn")
	c.Conns[0].Close()
	_, err := c.Nodes[0].Publish(ctxT(t), topic, []byte("x"))
	require.Error(t, err)
	assert.ErrorIs(t, err, pubsub.ErrClosed)
}

// Finding 9: a graceful leave is final on every peer: no heartbeat sent
// after the LEAVE re-adds the node anywhere.
func TestGracefulLeaveIsNeverUndoneByALateHeartbeat(t *testing.T) {
	for round := range 5 {
		t.Run(strconv.Itoa(round), func(t *testing.T) { gracefulLeaveRound(t, round) })
	}
}

func gracefulLeaveRound(t *testing.T, round int) {
	c := newCluster(t, 3, 3, pubsub.WithHeartbeatInterval(time.Millisecond*10))
	rejoined := watchJoins(t, c, "n0", 1, 2)
	c.CloseNode(t, 0)
	c.WaitConverged(t, 5*time.Second, 1, 2)
	// Several heartbeat intervals: a heartbeat racing the LEAVE would
	// have arrived by now.
	select {
	case on := <-rejoined:
		t.Fatalf("round %d: n0 re-added on %s after its graceful leave", round, on)
	case <-time.After(100 * time.Millisecond):
	}
}

// Finding 10: of two nodes joining with one ID at the same time, exactly
// one wins (the older incarnation), and the loser leaves no phantom member.
func TestDuplicateIDJoiningTogetherOneWins(t *testing.T) {
	c := newCluster(t, 3, 2)
	type result struct {
		node *pubsub.Node
		err  error
	}
	results := make(chan result, 2)
	var conns []*nats.Conn
	for i := range 2 {
		nc := c.Connect(t, i+1)
		conns = append(conns, nc)
	}
	var start sync.WaitGroup
	start.Add(1)
	for _, nc := range conns {
		go func() {
			start.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			n, err := pubsub.Join(ctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithNodeID("twin"))...)
			results <- result{n, err}
		}()
	}
	start.Done()
	var winner *pubsub.Node
	failures := 0
	for range 2 {
		r := <-results
		if r.err != nil {
			failures++
			assert.ErrorIs(t, r.err, pubsub.ErrInvalidConfig)
			continue
		}
		winner = r.node
	}
	require.Equal(t, 1, failures, "exactly one of two joins with one ID must fail")
	require.NotNil(t, winner)
	defer func() { require.NoError(t, winner.Close(context.Background())) }()
	inc := winner.Members()
	var twin pubsub.Member
	for _, m := range inc {
		if m.ID == "twin" {
			twin = m
		}
	}
	// Every node agrees on the winner's incarnation, well before a member
	// timeout could have cleaned up a phantom.
	testcluster.WaitFor(t, time.Second, func() bool {
		for _, n := range c.Nodes {
			found := false
			for _, m := range n.Members() {
				if m.ID == "twin" {
					found = m.Incarnation == twin.Incarnation
				}
			}
			if !found {
				return false
			}
		}
		return true
	}, "peers do not all hold the winning twin incarnation %d", twin.Incarnation)
	topic := ownedBy(t, winner, "twin-topic")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[0], topic, rec.handler)
	ack, err := c.Nodes[1].Publish(ctxT(t), topic, []byte("x"))
	mustAccept(t, ack, err, 1)
	assert.Equal(t, []string{"x"}, rec.of(s.ID()))
}

// Found in review: under KeepMajority, graceful leaves must shrink the stable
// view, so a cluster scaled down one graceful leave at a time keeps serving,
// and scales up again with new IDs.
func TestKeepMajorityGracefulScaleDownKeepsServing(t *testing.T) {
	c := newCluster(t, 1, 3, pubsub.WithPartitionPolicy(pubsub.KeepMajority))
	c.CloseNode(t, 0)
	c.WaitConverged(t, 10*time.Second)
	c.CloseNode(t, 1)
	c.WaitConverged(t, 10*time.Second)
	survivor := c.Nodes[2]
	publishUntilAccepted(t, survivor, "alone", []byte("x"), 0, 2*time.Second)
	for _, id := range []string{"n3", "n4"} {
		c.AddNode(t, id, 0, append(append([]pubsub.Option{}, fast...), pubsub.WithPartitionPolicy(pubsub.KeepMajority))...)
	}
	c.WaitConverged(t, 10*time.Second)
	for i := range 3 {
		topic := ownedBy(t, survivor, fmt.Sprintf("scaled-%d", i))
		publishUntilAccepted(t, c.Nodes[3], topic, []byte("x"), 0, 2*time.Second)
	}
}

// Found in review: several goroutines of one node publishing while topics
// move must not lose messages as OutOfOrder: a retried attempt (after "not
// owner" or "not ready") is numbered anew.
func TestConcurrentPublishersKeepTheirMessagesThroughAHandoff(t *testing.T) {
	c := newCluster(t, 1, 2)
	ctx := ctxT(t)
	const topics = 20
	rec := newRecorder()
	for i := range topics {
		subscribe(t, c.Nodes[0], fmt.Sprintf("conc-%d", i), rec.handler)
	}
	pub := c.Nodes[0]
	var stop atomic.Bool
	var accepted, outOfOrder atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for k := 0; !stop.Load(); k++ {
				ack, err := pub.Publish(ctx, fmt.Sprintf("conc-%d", k%topics), []byte(fmt.Sprintf("g%d-%d", g, k)))
				if err != nil {
					continue
				}
				accepted.Add(1)
				for _, f := range ack.Failures {
					if f.Status == pubsub.OutOfOrder {
						outOfOrder.Add(1)
					}
				}
			}
		})
	}
	progress := func(min int64) {
		t.Helper()
		target := accepted.Load() + min
		testcluster.WaitFor(t, 10*time.Second, func() bool { return accepted.Load() >= target }, "publishers stalled")
	}
	progress(200)
	c.AddNode(t, "n2", 0, fast...)
	c.WaitConverged(t, 10*time.Second)
	progress(200)
	c.CloseNode(t, 2)
	c.WaitConverged(t, 10*time.Second)
	progress(200)
	stop.Store(true)
	wg.Wait()
	t.Logf("accepted %d, OutOfOrder failures %d", accepted.Load(), outOfOrder.Load())
	assert.Zero(t, outOfOrder.Load(), "accepted publishes dropped as OutOfOrder during a handoff")
}

// Join on a connection that is draining failed with nats.go's bare
// ErrConnectionDraining, against the package's promise that every error
// wraps one of its sentinels: it is ErrClosed now, and still says why.
func TestJoinOnADrainingConnectionWrapsErrClosed(t *testing.T) {
	c := newCluster(t, 1, 1)
	nc := c.Connect(t, 0)
	// A message held by a handler keeps the connection draining.
	hold, held := make(chan struct{}), make(chan struct{})
	_, err := nc.Subscribe("hold", func(*nats.Msg) { close(held); <-hold })
	require.NoError(t, err)
	require.NoError(t, nc.Publish("hold", nil))
	<-held
	require.NoError(t, nc.Drain())
	defer close(hold)
	require.True(t, nc.IsDraining())
	_, err = pubsub.Join(ctxT(t), nc, fast...)
	require.ErrorIs(t, err, pubsub.ErrClosed)
	assert.ErrorIs(t, err, nats.ErrConnectionDraining, "the cause is kept")
}
