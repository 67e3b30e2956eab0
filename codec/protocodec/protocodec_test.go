package protocodec_test

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/codec/protocodec"
)

var _ pubsub.Codec[*wrapperspb.StringValue] = protocodec.New[*wrapperspb.StringValue]()

func TestRoundTrip(t *testing.T) {
	c := protocodec.New[*structpb.Struct]()
	in, err := structpb.NewStruct(map[string]any{"id": 17.0, "name": "widget", "tags": []any{"a", "b"}})
	if err != nil {
		t.Fatal(err)
	}
	data, err := c.Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out) {
		t.Fatalf("decoded %v, want %v", out, in)
	}
	if out == in {
		t.Fatal("Decode must return a new message")
	}
}

func TestDecodeRejectsGarbage(t *testing.T) {
	c := protocodec.New[*wrapperspb.StringValue]()
	for _, data := range [][]byte{{0xff}, {0x0a, 0x05, 'a'}, {0x0a, 0x02, 0xff, 0xfe}} {
		if v, err := c.Decode(data); err == nil {
			t.Errorf("Decode(%x) = %v, want an error", data, v)
		}
	}
}

func TestEmptyAndDeterministic(t *testing.T) {
	c := &protocodec.Codec[*wrapperspb.StringValue]{Marshal: proto.MarshalOptions{Deterministic: true}}
	data, err := c.Encode(wrapperspb.String(""))
	if err != nil || len(data) != 0 {
		t.Fatalf("empty message encodes to %x, %v", data, err)
	}
	v, err := c.Decode(nil)
	if err != nil || v == nil || v.GetValue() != "" {
		t.Fatalf("Decode(nil) = %v, %v", v, err)
	}
}
