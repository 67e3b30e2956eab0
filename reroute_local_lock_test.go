package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// A share refused under deliverWithin's subscriber read lock (MailboxFull,
// SubscriberGone) that is its batch's last status runs the batch's done:
// on the owner's node that re-routes the share, and to a member on the
// same node delivers again. Set under the lock, that took the read lock
// again inside it, and a Subscribe or Unsubscribe waiting for the write
// lock between the two deadlocked the node for good (found by review;
// failed 3 runs of 3 before the statuses were set past the lock).
//
// One node owns the topic; group g has two members on it, A (mailbox 1,
// blocked) and B. A 1-message batch assigned to A is refused MailboxFull
// and re-routed to B, while other goroutines Subscribe and Unsubscribe
// another topic on the node.
func TestRerouteToALocalMemberDoesNotDeadlockWithSubscribes(t *testing.T) {
	// Its own server and node rather than testcluster's: the deadlock
	// makes Close hang for good (shutdown's takeAll needs the write lock
	// whatever Close's ctx says), and testcluster's cleanup would wait for
	// it until the binary's timeout, hiding this test's message. A node
	// that deadlocked is left behind (the binary's leak check then fails
	// too).
	srv, err := embedded.StartServer()
	require.NoError(t, err)
	nc, err := nats.Connect(srv.ClientURL())
	require.NoError(t, err)
	jctx, jcancel := context.WithTimeout(context.Background(), 10*time.Second)
	n, err := pubsub.Join(jctx, nc, append(append([]pubsub.Option{}, fast...), pubsub.WithEvictAfter(1<<20))...)
	jcancel()
	require.NoError(t, err)
	t.Cleanup(func() {
		closed := make(chan struct{})
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = n.Close(ctx)
			close(closed)
		}()
		select {
		case <-closed:
			nc.Close()
			srv.Shutdown()
		case <-time.After(8 * time.Second):
			t.Errorf("node Close hung: the node is deadlocked and left running")
		}
	})
	topic := ownedBy(t, n, "reroute-rlock")

	release := make(chan struct{})
	unblock := sync.OnceFunc(func() { close(release) })
	t.Cleanup(unblock)
	var aCalls, bCalls atomic.Int64
	_, err = n.Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error {
		aCalls.Add(1)
		<-release
		return nil
	}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
	require.NoError(t, err)
	_, err = n.Subscribe(ctxT(t), topic, func(context.Context, *pubsub.Message) error {
		bCalls.Add(1)
		return nil
	}, pubsub.WithGroup("g"))
	require.NoError(t, err)

	// Fill A: one batch blocked in its handler, one queued behind it.
	for i := 0; i < 8; i++ {
		_, err := n.PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte(fmt.Sprintf("fill-%d", i))}}, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return aCalls.Load() == 1 }, 5*time.Second, 10*time.Millisecond)

	// Writers on the node's subscriber lock.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var churned atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				s, err := n.Subscribe(ctx, fmt.Sprintf("other-%d", w), func(context.Context, *pubsub.Message) error { return nil })
				if err == nil {
					_ = s.Unsubscribe(ctx)
					churned.Add(1)
				}
				cancel()
			}
		}()
	}
	defer func() {
		close(stop)
		waited := make(chan struct{})
		go func() { wg.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(5 * time.Second): // stuck on the node's lock: left behind
		}
	}()

	// lockFree reports whether a Subscribe on the node (its subscriber
	// write lock) completes within 3 s. Subscribe blocks on that lock
	// whatever its ctx says, so it is run apart.
	lockFree := func() bool {
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			if s, err := n.Subscribe(ctx, "probe", func(context.Context, *pubsub.Message) error { return nil }); err == nil {
				_ = s.Unsubscribe(ctx)
			}
		}()
		select {
		case <-done:
			return true
		case <-time.After(3 * time.Second):
			return false
		}
	}

	deadline := time.Now().Add(4 * time.Second)
	var published int
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_, err := n.Publish(ctx, topic, []byte(fmt.Sprintf("m-%d", published)))
		cancel()
		if err != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pubsub.ErrTimeout)) {
			t.Fatalf("publish %d hung (%v) after %d subscribe/unsubscribe rounds; the node's subscriber lock is free: %v "+
				"(false: deadlocked, deliverWithin's RLock taken again from inside it)", published, err, churned.Load(), lockFree())
		}
		require.NoError(t, err)
		published++
	}
	t.Logf("%d publishes, %d subscribe/unsubscribe rounds, B ran %d", published, churned.Load(), bCalls.Load())
}
