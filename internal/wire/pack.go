package wire

import (
	"encoding/binary"
	"errors"
)

// Pack appends msgs to dst, each as a uvarint length and its bytes.
func Pack(dst []byte, msgs [][]byte) []byte {
	size := 0
	for _, m := range msgs {
		size += binary.MaxVarintLen32 + len(m)
	}
	if cap(dst)-len(dst) < size {
		grown := make([]byte, len(dst), len(dst)+size)
		copy(grown, dst)
		dst = grown
	}
	for _, m := range msgs {
		dst = binary.AppendUvarint(dst, uint64(len(m)))
		dst = append(dst, m...)
	}
	return dst
}

// ErrBadPacking reports a packed field that does not hold what it claims.
var ErrBadPacking = errors.New("wire: malformed packed messages")

// Validate checks, without allocating, that packed holds exactly count
// messages.
func Validate(packed []byte, count uint32) error {
	if uint64(count) > uint64(len(packed)) {
		return ErrBadPacking // every message takes at least its length byte
	}
	for i := uint32(0); i < count; i++ {
		l, n := binary.Uvarint(packed)
		if n <= 0 || l > uint64(len(packed)-n) {
			return ErrBadPacking
		}
		packed = packed[n+int(l):]
	}
	if len(packed) != 0 {
		return ErrBadPacking
	}
	return nil
}

// Each calls fn with every message of a packed field that Validate accepted;
// the messages alias packed.
func Each(packed []byte, fn func([]byte)) {
	for len(packed) > 0 {
		l, n := binary.Uvarint(packed)
		if n <= 0 || l > uint64(len(packed)-n) {
			return
		}
		packed = packed[n:]
		fn(packed[:l:l])
		packed = packed[l:]
	}
}
