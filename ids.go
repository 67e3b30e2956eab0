package pubsub

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"reflect"
)

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
