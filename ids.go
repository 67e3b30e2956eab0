package pubsub

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"reflect"

	"github.com/clusterpubsub/pubsub/natsutil"
)

// maxProducerIDLen bounds the producer ID a request from the wire may
// carry. A producer is named by 16 hex digits (a BatchingProducer) or by its
// node's ID and tag (the node's implicit producer, up to 136 bytes). Owners
// and subscriptions remember producers by ID (maxTrackedProducers each, about
// maxNodeProducerMarks per node), so an ID of any length would make those
// bounds bounds in entries of any size.
const maxProducerIDLen = natsutil.MaxNodeIDLen + 32

// randomID names a node or a producer that was given no name.
func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func randomUint64() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

// isNilPointer reports whether v holds a nil pointer (a typed nil in an
// interface), which == nil does not catch.
func isNilPointer(v any) bool {
	rv := reflect.ValueOf(v)
	return rv.Kind() == reflect.Pointer && rv.IsNil()
}

// boundedPut sets m[key] to v and returns m, made if nil. A key new to a
// map already holding limit entries first makes it forget an arbitrary
// one (forgot): what maps keyed by names from the wire (producers, split
// batches) give up to stay bounded. Callers count it (Node.forgotMark).
func boundedPut[K comparable, V any](m map[K]V, key K, v V, limit int) (_ map[K]V, forgot bool) {
	if m == nil {
		m = make(map[K]V)
	}
	if _, known := m[key]; !known && len(m) >= limit {
		for k := range m {
			delete(m, k)
			forgot = true
			break
		}
	}
	m[key] = v
	return m, forgot
}

// maxLocalIDLen bounds a subscriber's local ID from the wire: its node's
// tag and a counter (at most 21 bytes), and a group name (a topic name)
// after groupMark. The owner keeps a subscriber's ID for as long as it
// holds the subscriber, so a request naming a longer one is malformed.
const maxLocalIDLen = 32 + len(groupMark) + natsutil.MaxTopicLen
