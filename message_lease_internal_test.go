package pubsub

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLeaseMessagesSizes(t *testing.T) {
	for _, tc := range []struct {
		n, capacity int
		pooled      bool
	}{
		{0, 0, false},
		{63, 63, false},
		{64, 64, true},
		{65, 128, true},
		{2000, 2048, true},
		{8192, 8192, true},
		{8193, 8193, false},
	} {
		t.Run(fmt.Sprintf("%d messages", tc.n), func(t *testing.T) {
			l := leaseMessages(tc.n)
			assert.Equal(t, 0, len(l.msgs))
			assert.Equal(t, tc.capacity, cap(l.msgs))
			assert.Equal(t, tc.pooled, l.bucket != 0)
			l.release()
		})
	}
}

// The last release, and only it, clears the Messages (so a pooled slice
// keeps no batch's buffers alive) and empties the slice.
func TestLeaseClearsOnlyOnTheLastRelease(t *testing.T) {
	l := leaseMessages(100)
	for i := range 100 {
		l.msgs = append(l.msgs, Message{Topic: "t", Data: []byte{byte(i)}, Publisher: "p"})
	}
	all := l.msgs[:100:100]
	l.hold()
	l.hold()
	l.release()
	l.release()
	require.Equal(t, "t", all[99].Topic, "cleared while a holder remained")
	require.Len(t, l.msgs, 100)
	l.release()
	assert.Empty(t, l.msgs)
	for i := range all {
		require.Equal(t, Message{}, all[i], "message %d kept after the last release", i)
	}
}

// A node's deliveries take their Messages from the pool: the slice a
// released batch used serves a later batch of the same size bucket.
func TestLeasedMessagesAreReused(t *testing.T) {
	// sync.Pool drops some puts at random under the race detector, so one
	// round may miss; 100 cannot all.
	reused := false
	for range 100 {
		a := leaseMessages(2000)
		p := &a.msgs[:1][0]
		a.release()
		b := leaseMessages(1500)
		reused = reused || &b.msgs[:1][0] == p
		b.release()
		if reused {
			break
		}
	}
	assert.True(t, reused, "a released slice was never leased again")
}
