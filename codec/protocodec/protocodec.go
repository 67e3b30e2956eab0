// Package protocodec encodes typed topics' values with protobuf, so a
// generated message type needs no glue:
//
//	orders, err := pubsub.NewTopic(node, "orders", protocodec.New[*orderpb.Order]())
//
// It depends only on google.golang.org/protobuf, which the core package
// already uses for its wire format.
package protocodec

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

// Codec encodes and decodes messages of the generated type T (a pointer
// type, such as *orderpb.Order) with proto.Marshal and proto.Unmarshal. It
// implements pubsub.Codec[T] and is safe for concurrent use. T must be a
// concrete generated type: with an interface such as proto.Message, Decode
// has no type to allocate and panics.
type Codec[T proto.Message] struct {
	// Marshal and Unmarshal options; the zero values are protobuf's
	// defaults. Deterministic marshalling, for example, is
	// MarshalOptions{Deterministic: true}.
	Marshal   proto.MarshalOptions
	Unmarshal proto.UnmarshalOptions
}

// New returns a Codec for T with protobuf's default options.
func New[T proto.Message]() *Codec[T] { return &Codec[T]{} }

// Encode marshals v. A nil v encodes as an empty message.
func (c *Codec[T]) Encode(v T) ([]byte, error) {
	return c.Marshal.Marshal(v)
}

// Decode unmarshals data into a new T.
func (c *Codec[T]) Decode(data []byte) (T, error) {
	var zero T
	// Generated types answer ProtoReflect on a nil pointer: it names the
	// type to allocate.
	v, ok := zero.ProtoReflect().Type().New().Interface().(T)
	if !ok {
		return zero, fmt.Errorf("protocodec: %T does not make new messages of its own type", zero)
	}
	if err := c.Unmarshal.Unmarshal(data, v); err != nil {
		return zero, err
	}
	return v, nil
}
