package pubsub

import (
	"context"
	"encoding/json"
	"fmt"
)

// Typed topics: a thin view over the byte API. Topic.Publish is
// PublishMessages, Topic.Subscribe is Subscribe and TypedProducer is a
// BatchingProducer, with the same semantics and acks; only the payload is
// encoded and decoded on the way.

// Codec turns values of T into message bytes and back. Implementations
// must be safe for concurrent use.
type Codec[T any] interface {
	Encode(v T) ([]byte, error)
	Decode(data []byte) (T, error)
}

// JSONCodec returns a Codec that encodes T with encoding/json.
func JSONCodec[T any]() Codec[T] { return jsonCodec[T]{} }

type jsonCodec[T any] struct{}

func (jsonCodec[T]) Encode(v T) ([]byte, error) { return json.Marshal(v) }

func (jsonCodec[T]) Decode(data []byte) (T, error) {
	var v T
	err := json.Unmarshal(data, &v)
	return v, err
}

// Topic is a typed view of one topic on one node. It is safe for
// concurrent use.
type Topic[T any] struct {
	node  *Node
	name  string
	codec Codec[T]
}

// NewTopic returns the typed view of topic name on n, with codec c. An
// invalid name fails with ErrInvalidTopic; a nil node or codec with
// ErrInvalidConfig.
func NewTopic[T any](n *Node, name string, c Codec[T]) (*Topic[T], error) {
	if n == nil || c == nil {
		return nil, fmt.Errorf("%w: NewTopic %q needs a node and a codec", ErrInvalidConfig, name)
	}
	if err := validateTopic(name); err != nil {
		return nil, err
	}
	return &Topic[T]{node: n, name: name, codec: c}, nil
}

// Name returns the topic's name.
func (t *Topic[T]) Name() string { return t.name }

// Publish encodes v and publishes it as PublishMessages does. A value the
// codec cannot encode (its Encode returns an error or panics) is rejected
// with ErrInvalidMessage (ReasonInvalidMessage) and nothing is sent.
func (t *Topic[T]) Publish(ctx context.Context, v T, opts ...PublishOption) (PublishAck, error) {
	return t.PublishMessage(ctx, v, Outgoing{}, opts...)
}

// PublishMessage is Publish with a key and a header for the message (its
// Data is ignored: the encoded v replaces it).
func (t *Topic[T]) PublishMessage(ctx context.Context, v T, m Outgoing, opts ...PublishOption) (PublishAck, error) {
	start := hookClock(t.node.hooks.publish)
	data, err := encode(t.codec, v)
	if err != nil {
		ack, err := t.node.reject(t.name, 1, fmt.Errorf("pubsub: publish to %q: encoding %T: %w: %v", t.name, v, ErrInvalidMessage, err))
		t.node.published(t.name, 1, outgoingBytes([]Outgoing{m}), start, ack, err)
		return ack, err
	}
	m.Data = data
	return t.node.PublishMessages(ctx, t.name, []Outgoing{m}, opts...)
}

// Subscribe registers h as Node.Subscribe does; h gets each message decoded,
// beside the Message itself (its Key, Header and Publisher). Bytes the
// codec rejects (its Decode returns an error or panics) never reach h: the
// batch's ack lists the subscriber as DecodeError, which never counts
// towards eviction, and the batch's later messages are still handled.
func (t *Topic[T]) Subscribe(ctx context.Context, h func(ctx context.Context, v T, m *Message) error, opts ...SubscribeOption) (*Subscription, error) {
	if h == nil {
		return nil, fmt.Errorf("%w: subscribe %q: nil handler", ErrInvalidConfig, t.name)
	}
	return t.node.Subscribe(ctx, t.name, func(ctx context.Context, m *Message) error {
		v, err := decode(t.codec, m.Data)
		if err != nil {
			return &decodeError{err: err}
		}
		return h(ctx, v, m)
	}, opts...)
}

// decode runs c.Decode, turning a panic into an error: a codec that panics
// on bytes it cannot read (a short buffer, say) rejected them as surely as
// one that returns an error, and the publisher's garbage must not count
// towards the subscriber's eviction nor stop the rest of the batch.
func decode[T any](c Codec[T], data []byte) (v T, err error) {
	defer codecPanic(c, &err)
	return c.Decode(data)
}

// encode runs c.Encode, turning a panic into an error: a codec that panics
// on a value it cannot encode (a nil field it dereferences, say) rejects it
// as one that returns an error does, and the caller gets ErrInvalidMessage
// rather than a panic out of Publish or Produce.
func encode[T any](c Codec[T], v T) (data []byte, err error) {
	defer codecPanic(c, &err)
	return c.Encode(v)
}

// codecPanic, deferred by encode and decode, turns a panic of codec c into
// *err.
func codecPanic(c any, err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("codec %T panicked: %v", c, r)
	}
}

// decodeError is a typed handler's report that its codec rejected a
// message: Subscription.run skips the message and reports DecodeError.
type decodeError struct{ err error }

func (e *decodeError) Error() string { return "pubsub: decoding a message: " + e.err.Error() }
func (e *decodeError) Unwrap() error { return e.err }

// TypedProducer is a BatchingProducer of values of T for one Topic: the
// same batching, order, futures and acks.
type TypedProducer[T any] struct {
	topic *Topic[T]
	p     *BatchingProducer
}

// NewTypedProducer returns a producer for t's topic through t's node, with
// cfg as NewBatchingProducer takes it. Close it to release its goroutine.
func NewTypedProducer[T any](t *Topic[T], cfg ProducerConfig) (*TypedProducer[T], error) {
	if t == nil {
		return nil, fmt.Errorf("%w: NewTypedProducer needs a Topic", ErrInvalidConfig)
	}
	p, err := NewBatchingProducer(t.node, t.name, cfg)
	if err != nil {
		return nil, err
	}
	return &TypedProducer[T]{topic: t, p: p}, nil
}

// Produce encodes v and queues it as BatchingProducer.Produce does. A value
// the codec cannot encode (its Encode returns an error or panics) fails its
// future with ErrInvalidMessage.
func (p *TypedProducer[T]) Produce(ctx context.Context, v T) *Produced {
	return p.ProduceMessage(ctx, v, Outgoing{})
}

// ProduceMessage is Produce with a key and a header for the message (m.Data
// is ignored: the encoded v replaces it).
func (p *TypedProducer[T]) ProduceMessage(ctx context.Context, v T, m Outgoing) *Produced {
	data, err := encode(p.topic.codec, v)
	if err != nil {
		return p.p.refused(p.p.failure(fmt.Errorf("pubsub: producer for %q: encoding %T: %w: %v", p.topic.name, v, ErrInvalidMessage, err)))
	}
	m.Data = data
	return p.p.ProduceMessage(ctx, m)
}

// Flush is BatchingProducer.Flush.
func (p *TypedProducer[T]) Flush(ctx context.Context) error { return p.p.Flush(ctx) }

// Close is BatchingProducer.Close.
func (p *TypedProducer[T]) Close(ctx context.Context) error { return p.p.Close(ctx) }

// Stats is BatchingProducer.Stats: a value the codec could not encode
// counts as Rejected with ReasonInvalidMessage.
func (p *TypedProducer[T]) Stats() ProducerStats { return p.p.Stats() }

// Producer returns the underlying BatchingProducer.
func (p *TypedProducer[T]) Producer() *BatchingProducer { return p.p }
