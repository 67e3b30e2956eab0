package pubsub

import (
	"errors"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// pendingForTest registers a call on r as send does, without NATS, and
// returns its token and the error it finished with.
func pendingForTest(r *rpc, alive func() bool) (uint64, chan error) {
	done := make(chan error, 1)
	r.mu.Lock()
	r.next++
	tok := r.next
	r.pending[tok] = &call{
		cb:    func(_ *wire.Reply, err error) { done <- err },
		timer: time.NewTimer(time.Hour),
		alive: alive,
	}
	r.mu.Unlock()
	return tok, done
}

// Regression (review): sweep ran every watched call's alive check under
// r.mu, the lock every send and reply takes; ownerAnswers takes
// members.mu there, a lock order (r.mu, then members.mu) nothing else
// has, one call to rpc under members.mu away from a deadlock. The checks
// run with r.mu free, and a swept call ends with ErrTimeout.
func TestRPCSweepChecksWithoutItsLock(t *testing.T) {
	r := &rpc{pending: map[uint64]*call{}}
	var lockFree []bool
	check := func(alive bool) func() bool {
		return func() bool {
			free := r.mu.TryLock()
			if free {
				r.mu.Unlock()
			}
			lockFree = append(lockFree, free)
			return alive
		}
	}
	_, goneDone := pendingForTest(r, check(false))
	_, liveDone := pendingForTest(r, check(true))
	_, unwatched := pendingForTest(r, nil)
	r.sweep()
	require.Len(t, lockFree, 2, "each watched call is checked once")
	assert.Equal(t, []bool{true, true}, lockFree, "alive checks ran under r.mu")
	select {
	case err := <-goneDone:
		assert.True(t, errors.Is(err, ErrTimeout), "swept call: %v", err)
	default:
		t.Fatal("the call whose peer is gone was not finished")
	}
	assert.Empty(t, liveDone, "a live peer's call was finished")
	assert.Empty(t, unwatched, "an unwatched call was finished")
	assert.Len(t, r.pending, 2)
}

// sweepUntil sweeps every step until the latest time asked for, so each
// call is swept within a step of its peer going, however the times asked
// for interleave (a timer moved to the latest time only skipped a middle
// leaver's deadline: its call was swept 300 ms late in the review's
// probe). close stops it.
func TestRPCSweepUntilSweepsEveryStep(t *testing.T) {
	r := &rpc{pending: map[uint64]*call{}}
	const step = 20 * time.Millisecond
	start := time.Now()
	deaths := []time.Duration{60 * time.Millisecond, 150 * time.Millisecond, 240 * time.Millisecond}
	dones := make([]chan error, len(deaths))
	for i, d := range deaths {
		dies := start.Add(d)
		_, dones[i] = pendingForTest(r, func() bool { return time.Now().Before(dies) })
	}
	var sweeps atomic.Int64 // a call whose peer stays: checked once per sweep
	pendingForTest(r, func() bool { sweeps.Add(1); return true })
	r.sweepUntil(start.Add(100*time.Millisecond), step)
	r.sweepUntil(start.Add(400*time.Millisecond), step)
	r.sweepUntil(start.Add(200*time.Millisecond), step)
	for i, d := range deaths {
		select {
		case err := <-dones[i]:
			assert.ErrorIs(t, err, ErrTimeout)
			late := time.Since(start) - d
			// A step late at most, plus generous scheduling slack.
			assert.Less(t, late, step+150*time.Millisecond, "call %d swept %v after its peer went", i, late)
		case <-time.After(5 * time.Second):
			t.Fatalf("call %d was never swept", i)
		}
	}
	require.Eventually(t, func() bool {
		r.laterMu.Lock()
		defer r.laterMu.Unlock()
		return r.laterTimer == nil
	}, 5*time.Second, 5*time.Millisecond, "the timer is not released after the latest time")
	assert.False(t, time.Now().Before(start.Add(400*time.Millisecond)), "released before the latest time asked for")
	// 400 ms at a 20 ms step is 20 sweeps; a loaded machine may lose some,
	// a timer that skips steps loses most.
	assert.GreaterOrEqual(t, sweeps.Load(), int64(8), "sweeps until the latest time, every step")

	r.sweepUntil(time.Now().Add(time.Hour), step)
	r.close()
	r.laterMu.Lock()
	defer r.laterMu.Unlock()
	assert.Nil(t, r.laterTimer, "close leaves the sweep timer running")
}

// Regression (review): the reply subscription had no pending limits
// ("replies are bounded by what we sent"), but anyone who can publish to
// the node's inbox prefix can send replies nobody asked for, and NATS
// would queue them without end. It is bounded as the inbox is, and what
// NATS drops there is counted with the inbox's drops (Stats.InboxDropped).
func TestReplyFloodIsBoundedAndCounted(t *testing.T) {
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() }) // after the node's Close
	n := joinWithForTest(t, s.ClientURL(), "n")
	msgs, bytes, err := n.rpc.sub.PendingLimits()
	require.NoError(t, err)
	assert.Equal(t, inboxPendingMsgs, msgs)
	assert.Equal(t, inboxPendingBytes, bytes)

	// A limit lowered so that a short flood overflows it, as a long one
	// overflows the real one.
	require.NoError(t, n.rpc.sub.SetPendingLimits(1, 1<<20))
	raw, err := nats.Connect(s.ClientURL())
	require.NoError(t, err)
	defer raw.Close()
	for i := range 20_000 {
		require.NoError(t, raw.Publish(n.rpc.prefix+strconv.FormatUint(uint64(1<<40+i), 36), []byte("forged")))
	}
	require.NoError(t, raw.Flush())
	waitForTest(t, "the reply subscription's drops in Stats", func() bool {
		n.checkInboxDrops()
		return n.Stats().InboxDropped > 0
	})
	dropped, err := n.rpc.sub.Dropped()
	require.NoError(t, err)
	assert.Positive(t, dropped)
}
