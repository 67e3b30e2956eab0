package pubsub

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newKeptForTest(maxBytes, maxCopies int) *keptCopies {
	k := &keptCopies{}
	k.init(time.Minute)
	k.maxBytes, k.maxCopies = maxBytes, maxCopies
	return k
}

// keepNew keeps a copy of size bytes under a new number and returns it,
// and whether the store kept it.
func keepNew(k *keptCopies, topic string, size int) (uint64, bool) {
	id := k.reserve(0)
	return id, k.keep(id, topic, make([]byte, size), false, 1)
}

// The store of kept copies stays within its bounds however fast a node
// publishes. At a bound it keeps no more copies (their requests name none,
// and their messages come back with the delivery), but it never drops a
// copy whose delivery may still come for a newer one: that delivery would
// be sent again with its messages a round trip later, behind the owner's
// next batch, and dropped as late. Only copies an at-least-once delivery
// took already make room.
func TestKeptCopiesStayWithinTheirBounds(t *testing.T) {
	t.Run("copies", func(t *testing.T) {
		k := newKeptForTest(1<<20, 8)
		var ids []uint64
		for i := range 13 {
			id, kept := keepNew(k, "t", 10)
			assert.Equal(t, i < 8, kept, "copy %d of 13", i)
			ids = append(ids, id)
		}
		copies, bytes := k.held()
		assert.Equal(t, 8, copies)
		assert.Equal(t, 80, bytes)
		for i, id := range ids[1:] {
			_, _, ok := k.take([]uint64{id}, "t", 1, false)
			assert.Equal(t, i+1 < 8, ok, "copy %d of 13", i+1)
		}
		// Taken by at-least-once deliveries, they make room for new
		// ones, from the oldest; the copy not taken stays.
		id, kept := keepNew(k, "t", 10)
		assert.True(t, kept)
		_, _, ok := k.take([]uint64{id}, "t", 1, true)
		assert.True(t, ok)
		_, _, ok = k.take([]uint64{ids[0]}, "t", 1, true)
		assert.True(t, ok, "the copy no delivery took")
		_, _, ok = k.take([]uint64{ids[1]}, "t", 1, true)
		assert.False(t, ok, "the oldest taken copy made room")
		copies, bytes = k.held()
		assert.Equal(t, 6, copies)
		assert.Equal(t, 60, bytes)
	})
	t.Run("bytes", func(t *testing.T) {
		k := newKeptForTest(100, 1000)
		first, kept := keepNew(k, "t", 60)
		assert.True(t, kept)
		second, kept := keepNew(k, "t", 60)
		assert.False(t, kept, "past the byte bound")
		_, bytes := k.held()
		assert.Equal(t, 60, bytes)
		_, _, ok := k.take([]uint64{second}, "t", 1, false)
		assert.False(t, ok)
		_, _, ok = k.take([]uint64{first}, "t", 1, false)
		assert.True(t, ok, "the older copy stays")
		// A batch larger than the whole store is not kept at all.
		big, kept := keepNew(k, "t", 101)
		assert.False(t, kept)
		_, _, ok = k.take([]uint64{big}, "t", 1, false)
		assert.False(t, ok)
	})
	t.Run("age", func(t *testing.T) {
		k := newKeptForTest(1<<20, 1000)
		old, _ := keepNew(k, "t", 10)
		k.byID[old].at = time.Now().Add(-2 * time.Minute) // past the minute it is kept
		fresh, _ := keepNew(k, "t", 10)
		copies, _ := k.held()
		assert.Equal(t, 1, copies)
		_, _, ok := k.take([]uint64{fresh}, "t", 1, false)
		assert.True(t, ok)
	})
	t.Run("numbers-of-taken-copies", func(t *testing.T) {
		// A copy that stays while thousands are kept and taken behind it
		// must not let the list of numbers grow without end.
		k := newKeptForTest(1<<20, 8)
		keepNew(k, "t", 1)
		for range 1000 {
			id, _ := keepNew(k, "t", 1)
			_, _, ok := k.take([]uint64{id}, "t", 1, true)
			require.True(t, ok)
		}
		assert.LessOrEqual(t, len(k.order), 2*8+1)
	})
}

// A copy is handed only to a delivery of its topic with its count, once
// unless copies of the delivery may follow (at-least-once), and is dropped
// by drop; hits and misses are counted.
func TestKeptCopyTake(t *testing.T) {
	k := newKeptForTest(1<<20, 100)
	id := k.reserve(0)
	assert.Equal(t, id, k.reserve(id), "a retry keeps its number")
	k.keep(id, "t", []byte{1, 'a'}, true, 1)

	_, _, ok := k.take([]uint64{id}, "other", 1, false)
	assert.False(t, ok, "another topic")
	_, _, ok = k.take([]uint64{id}, "t", 2, false)
	assert.False(t, ok, "another count")
	packed, withMeta, ok := k.take([]uint64{id}, "t", 1, false) // at-least-once: copies may follow
	require.True(t, ok)
	assert.Equal(t, []byte{1, 'a'}, packed)
	assert.True(t, withMeta)
	_, _, ok = k.take([]uint64{id}, "t", 1, true)
	assert.True(t, ok, "an at-least-once take left it")
	_, _, ok = k.take([]uint64{id}, "t", 1, true)
	assert.False(t, ok, "taken once, it is gone")
	assert.Equal(t, uint64(2), k.hits.Load())
	assert.Equal(t, uint64(3), k.misses.Load())

	other, _ := keepNew(k, "t", 5)
	k.drop(other)
	copies, bytes := k.held()
	assert.Zero(t, copies)
	assert.Zero(t, bytes)

	// The copy is the store's own: the request buffer it came from is
	// reused for the next send.
	buf := []byte{1, 'b'}
	id = k.reserve(0)
	k.keep(id, "t", buf, false, 1)
	buf[1] = 'x'
	packed, _, _ = k.take([]uint64{id}, "t", 1, true)
	assert.Equal(t, []byte{1, 'b'}, packed)
}

// A delivery of requests the owner merged names one copy per request, in
// order: it gets their messages one after the other, only when it holds
// them all in format 1 and their counts add up, and takes them all.
func TestKeptCopiesOfAMergedBatch(t *testing.T) {
	k := newKeptForTest(1<<20, 100)
	var ids []uint64
	for _, b := range [][]byte{{1, 'a'}, {1, 'b', 1, 'c'}, {1, 'd'}} {
		id := k.reserve(0)
		require.True(t, k.keep(id, "t", b, false, uint32(len(b)/2)))
		ids = append(ids, id)
	}
	_, _, ok := k.take(ids, "t", 3, true)
	assert.False(t, ok, "counts that do not add up")
	_, _, ok = k.take(append(ids[:2:2], ids[0]+1000), "t", 4, true)
	assert.False(t, ok, "a copy not held")
	packed, withMeta, ok := k.take(ids, "t", 4, true)
	require.True(t, ok)
	assert.False(t, withMeta)
	assert.Equal(t, []byte{1, 'a', 1, 'b', 1, 'c', 1, 'd'}, packed)
	copies, bytes := k.held()
	assert.Zero(t, copies, "every copy taken")
	assert.Zero(t, bytes)

	// Format 2 copies are not joined: a header may refer to the message
	// before it.
	m1, m2 := k.reserve(0), k.reserve(0)
	require.True(t, k.keep(m1, "t", []byte{2, 'a'}, true, 1))
	require.True(t, k.keep(m2, "t", []byte{2, 'b'}, true, 1))
	_, _, ok = k.take([]uint64{m1, m2}, "t", 2, true)
	assert.False(t, ok)

	// A forged list naming a copy twice takes it once.
	d := k.reserve(0)
	require.True(t, k.keep(d, "t", []byte{1, 'e'}, false, 1))
	_, _, ok = k.take([]uint64{d, d}, "t", 2, true)
	assert.True(t, ok)
	copies, bytes = k.held()
	assert.Equal(t, 2, copies, "the two format 2 copies")
	assert.Equal(t, 4, bytes)
}
