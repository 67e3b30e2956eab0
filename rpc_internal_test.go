package pubsub

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/internal/wire"
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

// sweepBy runs one sweep at the latest time asked for, on one timer, and
// close stops it.
func TestRPCSweepByRunsAtTheLatestTime(t *testing.T) {
	r := &rpc{pending: map[uint64]*call{}}
	var alive atomic.Bool
	alive.Store(true)
	_, done := pendingForTest(r, alive.Load)
	start := time.Now()
	r.sweepBy(start.Add(50 * time.Millisecond))
	r.sweepBy(start.Add(300 * time.Millisecond)) // the one that counts
	r.sweepBy(start.Add(100 * time.Millisecond))
	alive.Store(false) // the peer's grace is over by the later time
	select {
	case err := <-done:
		assert.ErrorIs(t, err, ErrTimeout)
	case <-time.After(5 * time.Second):
		t.Fatal("no sweep ran after the times asked for")
	}
	require.Eventually(t, func() bool {
		r.laterMu.Lock()
		defer r.laterMu.Unlock()
		return r.laterTimer == nil
	}, 5*time.Second, 5*time.Millisecond, "the timer is not released after the latest time")
	assert.False(t, time.Now().Before(start.Add(300*time.Millisecond)), "released before the latest time asked for")

	r.sweepBy(time.Now().Add(time.Hour))
	r.close()
	r.laterMu.Lock()
	defer r.laterMu.Unlock()
	assert.Nil(t, r.laterTimer, "close leaves the sweep timer running")
}
