package wire

import (
	"bytes"
	"encoding/binary"
	"slices"
	"unsafe"
)

// Format 2 of a packed batch (the packed_meta fields) carries each message's
// key and header beside its bytes:
//
//	message := uvarint(len(data) << 1 | hasMeta) [uvarint(len(meta)) meta] data
//	meta    := uvarint(len(key)) key header
//	header  := uvarint(names << 1) (uvarint(len(name)) name uvarint(values) (uvarint(len(v)) v)*)*
//	         | uvarint(1)    the header of the last message before it that had one
//
// A message without key or header costs its length and bytes, as in format
// 1: the flag is the length's low bit. Names are written in order, so equal
// headers encode alike, and a header repeated from one message to the next
// (a producer sending one header map with many messages) costs one byte.

// Meta is one message's key and header. The zero value is a message with
// neither.
type Meta struct {
	Key    string
	Header map[string][]string
	// Size caches the encoded size of the meta section with its header in
	// full (NewMeta sets it; 0 means not measured): a batch's metas are
	// measured several times on the way out, and walking a map each time
	// showed in profiles.
	Size int
}

// NewMeta returns the Meta of key and header, measured once.
func NewMeta(key string, header map[string][]string) Meta {
	m := Meta{Key: key, Header: header}
	m.Size = metaSize(m)
	return m
}

// Empty reports whether m carries nothing.
func (m Meta) Empty() bool { return m.Key == "" && len(m.Header) == 0 }

// MetaSize is the encoded size of m's meta section with its header in full
// (0 when m is empty): what the message counts towards the size limit.
func MetaSize(m Meta) int {
	if m.Size > 0 || m.Empty() {
		return m.Size
	}
	return metaSize(m)
}

func metaSize(m Meta) int {
	if m.Empty() {
		return 0
	}
	n := keySize(m.Key) + uvarintLen(uint64(len(m.Header))<<1)
	for k, vs := range m.Header {
		n += uvarintLen(uint64(len(k))) + len(k) + uvarintLen(uint64(len(vs)))
		for _, v := range vs {
			n += uvarintLen(uint64(len(v))) + len(v)
		}
	}
	return n
}

func keySize(key string) int { return uvarintLen(uint64(len(key))) + len(key) }

// metaEncoder tracks, along a batch, the header a later message may repeat.
type metaEncoder struct{ last map[string][]string }

// repeats reports whether m's header is the one encoded last (the same map),
// and remembers m's header otherwise.
func (e *metaEncoder) repeats(m Meta) bool {
	if len(m.Header) == 0 {
		return false
	}
	if sameMap(m.Header, e.last) {
		return true
	}
	e.last = m.Header
	return false
}

// sameMap reports whether a and b are the same map (not equal contents).
func sameMap(a, b map[string][]string) bool {
	return b != nil && *(*unsafe.Pointer)(unsafe.Pointer(&a)) == *(*unsafe.Pointer)(unsafe.Pointer(&b))
}

// PackedMetaSize is the size of msgs packed in format 2 with meta (one per
// message). Like PackMeta it measures the headers as they are now, not by
// the cached Size, so the two agree as long as no header changes between
// the calls (a caller may not change a header it handed over).
func PackedMetaSize(msgs [][]byte, meta []Meta) int {
	var e metaEncoder
	n := 0
	for i, m := range msgs {
		n += uvarintLen(uint64(len(m))<<1) + len(m)
		if meta[i].Empty() {
			continue
		}
		var ms int
		if e.repeats(meta[i]) {
			ms = keySize(meta[i].Key) + 1
		} else {
			ms = metaSize(meta[i])
		}
		n += uvarintLen(uint64(ms)) + ms
	}
	return n
}

// PackMeta appends msgs in format 2; meta holds one entry per message.
func PackMeta(dst []byte, msgs [][]byte, meta []Meta) []byte {
	if need := PackedMetaSize(msgs, meta); cap(dst)-len(dst) < need {
		grown := make([]byte, len(dst), len(dst)+need)
		copy(grown, dst)
		dst = grown
	}
	var e metaEncoder
	for i, data := range msgs {
		m := meta[i]
		if m.Empty() {
			dst = binary.AppendUvarint(dst, uint64(len(data))<<1)
			dst = append(dst, data...)
			continue
		}
		dst = binary.AppendUvarint(dst, uint64(len(data))<<1|1)
		if e.repeats(m) {
			dst = binary.AppendUvarint(dst, uint64(keySize(m.Key)+1))
			dst = appendString(dst, m.Key)
			dst = append(dst, 1)
		} else {
			dst = binary.AppendUvarint(dst, uint64(metaSize(m)))
			dst = appendString(dst, m.Key)
			dst = appendHeader(dst, m.Header)
		}
		dst = append(dst, data...)
	}
	return dst
}

// appendHeader appends h with its names in order, so that equal headers
// encode to equal bytes (and a decoder shares one map between them).
func appendHeader(dst []byte, h map[string][]string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(h))<<1)
	var small [8]string
	names := small[:0]
	if len(h) > len(small) {
		names = make([]string, 0, len(h))
	}
	for k := range h {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		vs := h[k]
		dst = appendString(dst, k)
		dst = binary.AppendUvarint(dst, uint64(len(vs)))
		for _, v := range vs {
			dst = appendString(dst, v)
		}
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// ValidateMeta checks, without allocating, that packed holds exactly count
// messages in format 2, each meta section well formed and each repeated
// header preceded by one to repeat.
func ValidateMeta(packed []byte, count uint32) error {
	if uint64(count) > uint64(len(packed)) {
		return ErrBadPacking
	}
	haveHeader := false
	for i := uint32(0); i < count; i++ {
		var meta []byte
		var ok bool
		if _, meta, packed, ok = nextMeta(packed); !ok {
			return ErrBadPacking
		}
		if meta == nil {
			continue
		}
		if haveHeader, ok = validMeta(meta, haveHeader); !ok {
			return ErrBadPacking
		}
	}
	if len(packed) != 0 {
		return ErrBadPacking
	}
	return nil
}

// EachMeta calls fn with every message of a format 2 packed field that
// ValidateMeta accepted: its bytes and its meta section (nil without one),
// both aliasing packed. A MetaDecoder given the sections in this order
// decodes them.
func EachMeta(packed []byte, fn func(data, meta []byte)) {
	for len(packed) > 0 {
		data, meta, rest, ok := nextMeta(packed)
		if !ok {
			return
		}
		fn(data, meta)
		packed = rest
	}
}

func nextMeta(b []byte) (data, meta, rest []byte, ok bool) {
	head, n := binary.Uvarint(b)
	if n <= 0 {
		return nil, nil, nil, false
	}
	b = b[n:]
	if head&1 == 1 {
		ml, n := binary.Uvarint(b)
		if n <= 0 || ml == 0 || ml > uint64(len(b)-n) {
			return nil, nil, nil, false
		}
		meta = b[n : n+int(ml) : n+int(ml)]
		b = b[n+int(ml):]
	}
	l := head >> 1
	if l > uint64(len(b)) {
		return nil, nil, nil, false
	}
	return b[:l:l], meta, b[l:], true
}

// validMeta checks a meta section's structure: every length within it, and
// nothing left over. Counts are bounded by the bytes left (every string
// takes at least its length byte), so a forged count cannot make a decoder
// allocate more than the message's size. haveHeader says whether an earlier
// message of the batch had a header, which this one may repeat; it returns
// whether one had, counting this one.
func validMeta(b []byte, haveHeader bool) (bool, bool) {
	var ok bool
	if _, b, ok = nextString(b); !ok {
		return haveHeader, false
	}
	if len(b) == 1 && b[0] == 1 { // the back-reference, in its one encoding
		return haveHeader, haveHeader
	}
	v, n := binary.Uvarint(b)
	if n <= 0 || v&1 == 1 {
		return haveHeader, false
	}
	b = b[n:]
	nh := v >> 1
	if nh > MaxHeaderNames || nh > uint64(len(b)) {
		return haveHeader, false
	}
	var prev []byte
	for i := range nh {
		var name []byte
		if name, b, ok = nextString(b); !ok {
			return haveHeader, false
		}
		// Names are unique and in order, as the encoder writes them: a
		// decoder never merges two entries (a forged batch repeating one
		// name cost quadratic time).
		if len(name) == 0 || (i > 0 && bytes.Compare(prev, name) >= 0) {
			return haveHeader, false
		}
		prev = name
		nv, n := binary.Uvarint(b)
		if n <= 0 || nv > uint64(len(b)-n) {
			return haveHeader, false
		}
		b = b[n:]
		for range nv {
			if _, b, ok = nextString(b); !ok {
				return haveHeader, false
			}
		}
	}
	return haveHeader || nh > 0, len(b) == 0
}

// MaxHeaderNames bounds the names of one message's header.
const MaxHeaderNames = 1024

func nextString(b []byte) (s, rest []byte, ok bool) {
	l, n := binary.Uvarint(b)
	if n <= 0 || l > uint64(len(b)-n) {
		return nil, nil, false
	}
	return b[n : n+int(l)], b[n+int(l):], true
}

// MetaDecoder decodes the meta sections of one batch, in order. Messages
// whose header repeats the previous one's (by reference, or encoded alike)
// get the same map: read-only, as every received header is.
type MetaDecoder struct {
	last       []byte // the last header decoded, encoded
	lastHeader map[string][]string
}

// Decode decodes the next meta section of a batch ValidateMeta accepted.
// The header is nil when the message has none. The key, names and values
// alias b, as the messages' bytes alias the packed field: b must stay
// unmodified while they are in use (nothing writes to a received NATS
// message). A message's values share one backing array.
func (d *MetaDecoder) Decode(b []byte) Meta {
	var m Meta // Size stays 0: a forged section may repeat a name, and re-encode smaller
	key, b, ok := nextString(b)
	if !ok {
		return m
	}
	m.Key = alias(key)
	if len(b) == 1 && b[0] == 1 || d.lastHeader != nil && bytes.Equal(b, d.last) {
		m.Header = d.lastHeader
		return m
	}
	if h := decodeHeader(b); h != nil {
		m.Header, d.last, d.lastHeader = h, b, h
	}
	return m
}

func decodeHeader(b []byte) map[string][]string {
	var ok bool
	v, n := binary.Uvarint(b)
	nh := v >> 1
	if n <= 0 || v&1 == 1 || nh == 0 || nh > uint64(len(b)) {
		return nil
	}
	b = b[n:]
	// Count the values first: one allocation holds them all.
	total, rest := 0, b
	for range nh {
		if _, rest, ok = nextString(rest); !ok {
			return nil
		}
		nv, n := binary.Uvarint(rest)
		if n <= 0 || nv > uint64(len(rest)-n) {
			return nil
		}
		rest = rest[n:]
		total += int(nv)
		for range nv {
			if _, rest, ok = nextString(rest); !ok {
				return nil
			}
		}
	}
	values := make([]string, total)
	h := make(map[string][]string, int(min(nh, 16))) // grows with what is really there
	for range nh {
		var name []byte
		name, b, _ = nextString(b)
		nv, n := binary.Uvarint(b)
		b = b[n:]
		var vs []string // nil without values, as published
		if nv > 0 {
			vs = values[:nv:nv]
			values = values[nv:]
		}
		for i := range vs {
			var v []byte
			v, b, _ = nextString(b)
			vs[i] = alias(v)
		}
		h[alias(name)] = vs // names are unique: validMeta checked
	}
	return h
}

// alias returns b as a string without copying it.
func alias(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

func uvarintLen(x uint64) int {
	n := 1
	for x >= 0x80 {
		x >>= 7
		n++
	}
	return n
}

// Keys returns the key of each message of a format 2 packed field that
// ValidateMeta accepted ("" for a message without one), aliasing packed,
// without decoding any header.
func Keys(packed []byte, count int) []string {
	keys := make([]string, 0, count)
	EachMeta(packed, func(_, meta []byte) {
		key := ""
		if meta != nil {
			if k, _, ok := nextString(meta); ok {
				key = alias(k)
			}
		}
		keys = append(keys, key)
	})
	return keys
}
