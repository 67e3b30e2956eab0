package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"testing"
)

// unpackMeta is ValidateMeta then EachMeta and DecodeMeta, as the node does.
func unpackMeta(packed []byte, count uint32) ([][]byte, []Meta, error) {
	if err := ValidateMeta(packed, count); err != nil {
		return nil, nil, err
	}
	var msgs [][]byte
	var meta []Meta
	var dec MetaDecoder
	EachMeta(packed, func(data, m []byte) {
		msgs = append(msgs, data)
		if m == nil {
			meta = append(meta, Meta{})
		} else {
			meta = append(meta, dec.Decode(m))
		}
	})
	return msgs, meta, nil
}

func sameMeta(a, b Meta) bool {
	return a.Key == b.Key && maps.EqualFunc(a.Header, b.Header, slices.Equal)
}

func TestPackMetaRoundTrip(t *testing.T) {
	msgs := [][]byte{[]byte("a"), {}, bytes.Repeat([]byte("x"), 300), []byte("last"), nil}
	meta := []Meta{
		{Key: "order-17"},
		{},
		{Key: string(bytes.Repeat([]byte("k"), 200)), Header: map[string][]string{"traceparent": {"00-abc-def-01"}, "multi": {"1", "", "3"}}},
		{Header: map[string][]string{"only": {"header"}}},
		{},
	}
	packed := PackMeta([]byte("prefix"), msgs, meta)
	if got, want := len(packed)-len("prefix"), PackedMetaSize(msgs, meta); got != want {
		t.Fatalf("packed %d bytes, PackedMetaSize says %d", got, want)
	}
	got, gotMeta, err := unpackMeta(packed[len("prefix"):], uint32(len(msgs)))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d messages, want %d", len(got), len(msgs))
	}
	for i := range msgs {
		if !bytes.Equal(got[i], msgs[i]) || !sameMeta(gotMeta[i], meta[i]) {
			t.Fatalf("message %d = %q %+v, want %q %+v", i, got[i], gotMeta[i], msgs[i], meta[i])
		}
	}
	if gotMeta[1].Header != nil || gotMeta[0].Header != nil {
		t.Fatal("a message without header must decode with a nil header")
	}
}

// A message without key or header costs in format 2 what it costs in
// format 1 (the flag is the length's low bit), except when that bit makes
// its length varint one byte longer.
func TestPackMetaCostsNothingWithoutMeta(t *testing.T) {
	msgs := [][]byte{[]byte("abc"), bytes.Repeat([]byte("y"), 40)}
	none := []Meta{{}, {}}
	if a, b := len(PackMeta(nil, msgs, none)), len(Pack(nil, msgs)); a != b {
		t.Fatalf("format 2 without meta: %d bytes, format 1: %d", a, b)
	}
}

func TestUnpackMetaRejectsMalformed(t *testing.T) {
	good := PackMeta(nil, [][]byte{[]byte("abc"), []byte("de")}, []Meta{{Key: "k", Header: map[string][]string{"h": {"v"}}}, {}})
	for name, c := range map[string]struct {
		b     []byte
		count uint32
	}{
		"count too high":           {good, 3},
		"count too low":            {good, 1},
		"truncated":                {good[:len(good)-1], 2},
		"huge count":               {good, 1 << 31},
		"bad varint":               {[]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, 1},
		"meta past end":            {[]byte{0x03, 0x09, 0x00}, 1},
		"empty meta":               {[]byte{0x03, 0x00, 'a'}, 1},
		"header count too high":    {[]byte{0x01, 0x02, 0x00, 0x7e}, 1},
		"value count too high":     {[]byte{0x01, 0x05, 0x00, 0x02, 0x01, 'h', 0x7f}, 1},
		"repeated name":            {[]byte{0x01, 0x0a, 0x00, 0x04, 0x01, 'h', 0x01, 0x01, 'v', 0x01, 'h', 0x00}, 1},
		"names out of order":       {[]byte{0x01, 0x0a, 0x00, 0x04, 0x01, 'h', 0x01, 0x01, 'v', 0x01, 'a', 0x00}, 1},
		"empty name":               {[]byte{0x01, 0x04, 0x00, 0x02, 0x00, 0x00}, 1},
		"back-reference first":     {[]byte{0x01, 0x02, 0x00, 0x01}, 1},
		"overlong back-reference":  {[]byte{0x01, 0x07, 0x00, 0x02, 0x01, 'a', 0x01, 0x01, 'b', 0x01, 0x03, 0x00, 0x81, 0x00}, 2},
		"odd header count":         {[]byte{0x01, 0x07, 0x00, 0x02, 0x01, 'a', 0x01, 0x01, 'b', 0x01, 0x02, 0x00, 0x03}, 2},
		"trailing bytes in meta":   {[]byte{0x01, 0x03, 0x00, 0x00, 0x00}, 1},
		"count, no bytes":          {nil, 1},
		"format 1 read as meta":    {Pack(nil, [][]byte{[]byte("abc")}), 1},
		"data length past the end": {[]byte{0x08, 'a'}, 1},
	} {
		if _, _, err := unpackMeta(c.b, c.count); !errors.Is(err, ErrBadPacking) {
			t.Errorf("%s: err = %v, want ErrBadPacking", name, err)
		}
	}
}

func FuzzUnpackMeta(f *testing.F) {
	f.Add(PackMeta(nil, [][]byte{[]byte("abc"), nil}, []Meta{{Key: "k", Header: map[string][]string{"h": {"v", "w"}}}, {}}), uint32(2))
	f.Add(PackMeta(nil, [][]byte{[]byte("x")}, []Meta{{}}), uint32(1))
	f.Fuzz(func(t *testing.T, b []byte, count uint32) {
		msgs, meta, err := unpackMeta(b, count)
		if err != nil {
			return
		}
		total := 0
		for i, m := range msgs {
			total += len(m) + MetaSize(meta[i])
		}
		if len(msgs) != int(count) || total > len(b) {
			t.Fatalf("unpacked %d messages, %d bytes, from %d bytes", len(msgs), total, len(b))
		}
		// What decodes re-encodes to something that decodes the same.
		again, againMeta, err := unpackMeta(PackMeta(nil, msgs, meta), count)
		if err != nil {
			t.Fatalf("repacking: %v", err)
		}
		for i := range msgs {
			if !bytes.Equal(again[i], msgs[i]) || !sameMeta(againMeta[i], meta[i]) {
				t.Fatalf("message %d changed on a round trip", i)
			}
		}
	})
}

// Equal headers encode to equal bytes whatever the map's order, and the
// messages of a batch that carry them in a row share one decoded map.
func TestEqualHeadersShareOneDecodedMap(t *testing.T) {
	h := func() map[string][]string {
		return map[string][]string{"a": {"1"}, "b": {"2"}, "c": {"3"}, "d": {"4", "5"}}
	}
	msgs := [][]byte{[]byte("x"), []byte("y"), []byte("z"), []byte("w")}
	meta := []Meta{{Key: "k1", Header: h()}, {Key: "k2", Header: h()}, {Header: map[string][]string{"a": {"other"}}}, {Header: h()}}
	packed := PackMeta(nil, msgs, meta)
	for range 20 { // map order is random: the encoding must not be
		if again := PackMeta(nil, msgs, []Meta{{Key: "k1", Header: h()}, {Key: "k2", Header: h()}, meta[2], {Header: h()}}); !bytes.Equal(again, packed) {
			t.Fatal("equal headers encoded differently")
		}
	}
	var got []Meta
	var dec MetaDecoder
	EachMeta(packed, func(_, m []byte) { got = append(got, dec.Decode(m)) })
	if got[0].Key != "k1" || got[1].Key != "k2" {
		t.Fatalf("keys %q %q", got[0].Key, got[1].Key)
	}
	same := func(a, b map[string][]string) bool {
		return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
	}
	if !same(got[0].Header, got[1].Header) {
		t.Error("equal headers in a row must share one map")
	}
	if same(got[1].Header, got[2].Header) || same(got[2].Header, got[3].Header) {
		t.Error("different headers must not share a map")
	}
	for i, m := range got {
		if !sameMeta(Meta{Key: m.Key, Header: m.Header}, Meta{Key: meta[i].Key, Header: meta[i].Header}) {
			t.Errorf("message %d decoded as %+v, want %+v", i, m, meta[i])
		}
	}
}

// A header map sent with several messages in a row is encoded once; the
// others refer to it in one byte, and decode to the same map.
func TestRepeatedHeaderIsEncodedOnce(t *testing.T) {
	h := map[string][]string{"tenant": {"acme"}, "content-type": {"application/json"}}
	msgs := [][]byte{[]byte("a"), []byte("b"), []byte("c"), []byte("d")}
	meta := []Meta{NewMeta("k1", h), NewMeta("k2", h), {}, NewMeta("k3", h)}
	packed := PackMeta(nil, msgs, meta)
	if len(packed) != PackedMetaSize(msgs, meta) {
		t.Fatalf("packed %d bytes, PackedMetaSize says %d", len(packed), PackedMetaSize(msgs, meta))
	}
	full := len(PackMeta(nil, msgs[:1], meta[:1]))
	if len(packed) > full+3*(len("k1")+6) {
		t.Fatalf("%d bytes for 4 messages, %d for the first alone: the header was not shared", len(packed), full)
	}
	// The bytes of the valid repeat, checked by hand: the second message's
	// meta is key "k2" and the repeat marker.
	if !bytes.Contains(packed, []byte{0x03, 0x04, 0x02, 'k', '2', 0x01, 'b'}) {
		t.Fatalf("no repeat marker in %x", packed)
	}
	got, gotMeta, err := unpackMeta(packed, 4)
	if err != nil {
		t.Fatal(err)
	}
	for i := range msgs {
		if !bytes.Equal(got[i], msgs[i]) || !sameMeta(gotMeta[i], Meta{Key: meta[i].Key, Header: meta[i].Header}) {
			t.Fatalf("message %d = %q %+v", i, got[i], gotMeta[i])
		}
	}
	if !sameMap(gotMeta[0].Header, gotMeta[3].Header) {
		t.Error("repeated headers must decode to one map")
	}
}

// A forged header of many names is refused, or decoded in linear time: it
// once cost quadratic time and memory when names repeated.
func TestForgedHeadersAreBounded(t *testing.T) {
	many := func(names int, name func(i int) []byte) []byte {
		var h []byte
		h = binary.AppendUvarint(h, uint64(names)<<1)
		for i := range names {
			n := name(i)
			h = binary.AppendUvarint(h, uint64(len(n)))
			h = append(h, n...)
			h = append(h, 0) // no values
		}
		meta := append([]byte{0x00}, h...) // empty key
		packed := []byte{0x01}             // an empty message with meta
		packed = binary.AppendUvarint(packed, uint64(len(meta)))
		return append(packed, meta...)
	}
	repeated := many(40000, func(int) []byte { return []byte("a") })
	if _, _, err := unpackMeta(repeated, 1); !errors.Is(err, ErrBadPacking) {
		t.Fatalf("40 000 copies of one name: %v, want ErrBadPacking", err)
	}
	tooMany := many(MaxHeaderNames+1, func(i int) []byte { return fmt.Appendf(nil, "n%05d", i) })
	if _, _, err := unpackMeta(tooMany, 1); !errors.Is(err, ErrBadPacking) {
		t.Fatalf("%d names: %v, want ErrBadPacking", MaxHeaderNames+1, err)
	}
	most := many(MaxHeaderNames, func(i int) []byte { return fmt.Appendf(nil, "n%05d", i) })
	_, meta, err := unpackMeta(most, 1)
	if err != nil || len(meta[0].Header) != MaxHeaderNames {
		t.Fatalf("%d names: %d decoded, %v", MaxHeaderNames, len(meta[0].Header), err)
	}
	if vs, ok := meta[0].Header["n00000"]; !ok || vs != nil {
		t.Fatalf("a name without values decodes to nil values, got %#v", vs)
	}
}
