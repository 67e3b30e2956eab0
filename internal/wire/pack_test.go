package wire

import (
	"bytes"
	"errors"
	"testing"
)

// unpack is Validate then Each, as the node does.
func unpack(packed []byte, count uint32) ([][]byte, error) {
	if err := Validate(packed, count); err != nil {
		return nil, err
	}
	var msgs [][]byte
	Each(packed, func(m []byte) { msgs = append(msgs, m) })
	return msgs, nil
}

func TestPackRoundTrip(t *testing.T) {
	msgs := [][]byte{[]byte("a"), {}, bytes.Repeat([]byte("x"), 300), []byte("last")}
	packed := Pack([]byte("prefix"), msgs)
	got, err := unpack(packed[len("prefix"):], uint32(len(msgs)))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d messages, want %d", len(got), len(msgs))
	}
	for i := range msgs {
		if !bytes.Equal(got[i], msgs[i]) {
			t.Fatalf("message %d = %q, want %q", i, got[i], msgs[i])
		}
	}
}

func TestUnpackRejectsMalformed(t *testing.T) {
	good := Pack(nil, [][]byte{[]byte("abc"), []byte("de")})
	for name, c := range map[string]struct {
		b     []byte
		count uint32
	}{
		"count too high":  {good, 3},
		"count too low":   {good, 1},
		"truncated":       {good[:len(good)-1], 2},
		"huge count":      {good, 1 << 31},
		"bad varint":      {[]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, 1},
		"length past end": {[]byte{0x05, 'a'}, 1},
		"count, no bytes": {nil, 1},
	} {
		if _, err := unpack(c.b, c.count); !errors.Is(err, ErrBadPacking) {
			t.Errorf("%s: err = %v, want ErrBadPacking", name, err)
		}
	}
	if msgs, err := unpack(nil, 0); err != nil || len(msgs) != 0 {
		t.Errorf("empty: %v, %v", msgs, err)
	}
}

func FuzzUnpack(f *testing.F) {
	f.Add(Pack(nil, [][]byte{[]byte("abc")}), uint32(1))
	f.Fuzz(func(t *testing.T, b []byte, count uint32) {
		msgs, err := unpack(b, count)
		if err != nil {
			return
		}
		total := 0
		for _, m := range msgs {
			total += len(m)
		}
		if len(msgs) != int(count) || total > len(b) {
			t.Fatalf("unpacked %d messages, %d bytes, from %d bytes", len(msgs), total, len(b))
		}
	})
}
