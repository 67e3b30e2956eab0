package pubsub

import (
	"context"
	"fmt"
	"slices"
	"unicode"
	"unicode/utf8"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// The message envelope: keys, headers and trace context that travel with
// each message inside the packed batch (wire format 2). A batch whose
// messages have none of them travels in format 1, exactly as before they
// existed.

// Header is a message's metadata: names to values, as NATS headers. Names
// are case-sensitive. A message published without one arrives with a nil
// Header; a received Header is shared by the node's subscribers and must be
// treated as read-only, like Message.Data. A name must be a non-empty token
// without whitespace, ':' or control characters.
type Header map[string][]string

// Get returns the first value of name, or "".
func (h Header) Get(name string) string {
	if vs := h[name]; len(vs) > 0 {
		return vs[0]
	}
	return ""
}

// Values returns every value of name; the slice is the header's own.
func (h Header) Values(name string) []string { return h[name] }

// Set replaces the values of name with value.
func (h Header) Set(name, value string) { h[name] = []string{value} }

// Add appends value to the values of name.
func (h Header) Add(name, value string) { h[name] = append(h[name], value) }

// Del removes name.
func (h Header) Del(name string) { delete(h, name) }

// clone copies h, values included, so adding to the copy leaves h alone;
// nil stays nil.
func (h Header) clone() Header {
	if h == nil {
		return nil
	}
	c := make(Header, len(h))
	for k, vs := range h {
		c[k] = slices.Clone(vs)
	}
	return c
}

// Outgoing is one message to publish with its optional key and header.
type Outgoing struct {
	Data []byte
	// Key is an optional routing key: consumer groups send every message of
	// one key to the same member. It arrives as Message.Key.
	Key string
	// Header is optional metadata; it arrives as Message.Header.
	Header Header
}

// PublishOption configures one PublishMessages or Topic.Publish call.
type PublishOption func(*publishConfig)

// publishConfig is what PublishOptions set.
type publishConfig struct {
	ack AckLevel // WithAck
}

// Propagator carries context across the publish, typically a W3C trace
// context, in each message's header. The core package calls it and never
// imports a tracing library; an OpenTelemetry adapter implements it.
type Propagator interface {
	// Inject runs on the publishing node with the publishing call's ctx
	// (for a producer, the ctx given to Produce): once per message of
	// PublishMessages, Produce or ProduceMessage, with or without a key or
	// header of its own, and once per call for a batch of plain bytes
	// (Publish, PublishBatch), whose messages then share the header. h is
	// a copy of the message's header, never nil; Inject may add to it.
	Inject(ctx context.Context, h Header)
	// Extract runs once per message for each subscription, before its
	// handler, and returns the ctx the handler gets for that message. h is
	// nil when the message has no header. A panic in Extract is logged
	// and the handler gets ctx as it was.
	Extract(ctx context.Context, h Header) context.Context
}

// WithPropagator sets the node's Propagator. Default: none, and then
// nothing is injected or extracted, at no cost.
func WithPropagator(p Propagator) Option { return func(c *Config) { c.Propagator = p } }

// validateHeader checks every name of h, and their number.
func validateHeader(h Header) error {
	if len(h) > wire.MaxHeaderNames {
		return fmt.Errorf("%w: a header of %d names, limit %d", ErrInvalidMessage, len(h), wire.MaxHeaderNames)
	}
	for name := range h {
		if err := validHeaderName(name); err != nil {
			return err
		}
	}
	return nil
}

func validHeaderName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty header name; name every header", ErrInvalidMessage)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= utf8.RuneSelf {
			return validHeaderNameRunes(name) // rare: the whole name, rune by rune
		}
		if c <= ' ' || c == ':' || c == 0x7f {
			return invalidHeaderName(name)
		}
	}
	return nil
}

func validHeaderNameRunes(name string) error {
	if !utf8.ValidString(name) {
		return fmt.Errorf("%w: header name %q is not UTF-8", ErrInvalidMessage, name)
	}
	for _, r := range name {
		if unicode.IsSpace(r) || unicode.IsControl(r) || r == ':' {
			return invalidHeaderName(name)
		}
	}
	return nil
}

func invalidHeaderName(name string) error {
	return fmt.Errorf("%w: header name %q holds whitespace, ':' or a control character", ErrInvalidMessage, name)
}

// msgBatch is a batch on its way to the owner: the messages' bytes, and
// their keys and headers when any message has one. meta is nil otherwise,
// so a plain batch costs what it did before keys and headers existed.
type msgBatch struct {
	data [][]byte
	meta []wire.Meta // nil, or one entry per message
}

func (b msgBatch) len() int { return len(b.data) }

// add appends one message; meta makes the batch carry keys and headers from
// the first message that has any.
func (b *msgBatch) add(data []byte, meta wire.Meta) {
	if b.meta == nil && !meta.Empty() {
		b.meta = make([]wire.Meta, len(b.data), cap(b.data))
	}
	b.data = append(b.data, data)
	if b.meta != nil {
		b.meta = append(b.meta, meta)
	}
}

// size is message i's size as it counts towards MaxMessageSize.
func (b *msgBatch) size(i int) int {
	if b.meta == nil {
		return len(b.data[i])
	}
	return len(b.data[i]) + wire.MetaSize(b.meta[i])
}

// bytes is the sum of size over the batch.
func (b *msgBatch) bytes() int {
	total := 0
	for i := range b.data {
		total += b.size(i)
	}
	return total
}

// slice returns messages [i, j).
func (b msgBatch) slice(i, j int) msgBatch {
	s := msgBatch{data: b.data[i:j]}
	if b.meta != nil {
		s.meta = b.meta[i:j]
	}
	return s
}

// outgoingBatch validates msgs and turns them into a batch, injecting prop
// (if any) into each message's header with ctx. Headers given by the caller
// are never modified: one a propagator adds to is copied first.
func outgoingBatch(ctx context.Context, msgs []Outgoing, prop Propagator) (msgBatch, error) {
	b := msgBatch{data: make([][]byte, len(msgs))}
	for i, m := range msgs {
		b.data[i] = m.Data
		meta, err := messageMeta(ctx, m.Key, m.Header, prop)
		if err != nil {
			return msgBatch{}, fmt.Errorf("message %d: %w", i, err)
		}
		b.setMeta(i, len(msgs), meta)
	}
	return b, nil
}

// setMeta records message i's meta, making room for n once one has some.
func (b *msgBatch) setMeta(i, n int, meta wire.Meta) {
	if meta.Empty() {
		return
	}
	if b.meta == nil {
		b.meta = make([]wire.Meta, n)
	}
	b.meta[i] = meta
}

// messageMeta validates h and returns one outgoing message's key and
// header, after prop's Inject (whose names are checked too: a propagator
// adding an invalid name is refused like a caller doing so).
func messageMeta(ctx context.Context, key string, h Header, prop Propagator) (wire.Meta, error) {
	if err := validateHeader(h); err != nil {
		return wire.Meta{}, err
	}
	if prop != nil {
		if h == nil {
			h = Header{}
		} else {
			h = h.clone()
		}
		prop.Inject(ctx, h)
		if err := validateHeader(h); err != nil {
			return wire.Meta{}, fmt.Errorf("after the Propagator's Inject: %w", err)
		}
	}
	if len(h) == 0 {
		h = nil
	}
	return wire.NewMeta(key, h), nil
}

// plainBatch is a batch of bytes only, with prop's injections if a
// propagator is set.
func plainBatch(ctx context.Context, data [][]byte, prop Propagator) (msgBatch, error) {
	b := msgBatch{data: data}
	if prop == nil {
		return b, nil
	}
	// Every message has the same ctx and no header of its own: one Inject,
	// one header shared by all (it also packs as one-byte back-references).
	meta, err := messageMeta(ctx, "", nil, prop)
	if err != nil {
		return msgBatch{}, err
	}
	for i := range data {
		b.setMeta(i, len(data), meta)
	}
	return b, nil
}
