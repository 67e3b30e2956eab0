package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// received is what a handler saw of one message.
type received struct {
	data, key, publisher string
	header               pubsub.Header
	trace                string // the test propagator's value in the handler's ctx
}

// envelopes records whole messages per subscription.
type envelopes struct {
	mu  sync.Mutex
	got []received
}

func (e *envelopes) handler(ctx context.Context, m *pubsub.Message) error {
	tr, _ := ctx.Value(traceKey{}).(string)
	e.mu.Lock()
	e.got = append(e.got, received{data: string(m.Data), key: m.Key, publisher: m.Publisher, header: m.Header, trace: tr})
	e.mu.Unlock()
	return nil
}

func (e *envelopes) all() []received {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]received(nil), e.got...)
}

// envelopePath is a publishing node, a subscribing node and a topic.
type envelopePath struct {
	pub, sub *pubsub.Node
	topic    string
}

// envelopePaths are the two ways a batch travels: everything on one node
// (publisher, owner and subscriber: no NATS at all), and publisher, owner
// and subscriber on three nodes, each on its own server.
func envelopePaths(t *testing.T, c *testcluster.Cluster, prefix string) map[string]envelopePath {
	return map[string]envelopePath{
		"local":  {c.Nodes[0], c.Nodes[0], ownedBy(t, c.Nodes[0], prefix+"-local")},
		"remote": {c.Nodes[0], c.Nodes[2], ownedBy(t, c.Nodes[1], prefix+"-remote")},
	}
}

func TestKeysAndHeadersRoundTrip(t *testing.T) {
	c := newCluster(t, 3, 3)
	for name, p := range envelopePaths(t, c, "envelope") {
		t.Run(name, func(t *testing.T) {
			var e envelopes
			subscribe(t, p.sub, p.topic, e.handler)
			msgs := []pubsub.Outgoing{
				{Data: []byte("keyed"), Key: "order-17", Header: pubsub.Header{"content-type": {"application/json"}, "multi": {"a", "b"}}},
				{Data: []byte("plain")},
				{Data: []byte("header-only"), Header: pubsub.Header{"x": {""}}},
				{Data: nil, Key: "key-only"},
			}
			ack, err := p.pub.PublishMessages(ctxT(t), p.topic, msgs)
			mustAccept(t, ack, err, 1)
			// A batch without keys or headers, and one message alone.
			ack, err = p.pub.PublishBatch(ctxT(t), p.topic, [][]byte{[]byte("batch-plain")})
			mustAccept(t, ack, err, 1)

			got := e.all()
			require.Len(t, got, 5)
			want := []received{
				{data: "keyed", key: "order-17", header: pubsub.Header{"content-type": {"application/json"}, "multi": {"a", "b"}}},
				{data: "plain"},
				{data: "header-only", header: pubsub.Header{"x": {""}}},
				{data: "", key: "key-only"},
				{data: "batch-plain"},
			}
			for i, w := range want {
				w.publisher = p.pub.ID()
				assert.Equal(t, w, got[i], "message %d", i)
			}
			assert.Nil(t, got[1].header, "a message published without a header arrives with a nil Header")
			assert.Nil(t, got[4].header)
			assert.Equal(t, "application/json", got[0].header.Get("content-type"))
			assert.Equal(t, []string{"a", "b"}, got[0].header.Values("multi"))
		})
	}
}

func TestKeysAndHeadersThroughAProducer(t *testing.T) {
	c := newCluster(t, 3, 3)
	for name, p := range envelopePaths(t, c, "envelope-producer") {
		t.Run(name, func(t *testing.T) {
			var e envelopes
			subscribe(t, p.sub, p.topic, e.handler)
			prod, err := pubsub.NewBatchingProducer(p.pub, p.topic, pubsub.ProducerConfig{MaxInFlight: 4})
			require.NoError(t, err)
			defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
			const count = 300
			futures := make([]*pubsub.Produced, count)
			for i := range futures {
				switch i % 3 {
				case 0:
					futures[i] = prod.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i), Key: fmt.Sprint("k", i), Header: pubsub.Header{"i": {fmt.Sprint(i)}}})
				case 1:
					futures[i] = prod.Produce(ctxT(t), msg(i))
				default:
					futures[i] = prod.ProduceMessage(ctxT(t), pubsub.Outgoing{Data: msg(i)})
				}
			}
			for i, f := range futures {
				ack, err := f.Wait(ctxT(t))
				require.NoError(t, err, "message %d", i)
				require.Equal(t, 1, ack.Delivered)
			}
			got := e.all()
			require.Len(t, got, count)
			for i, r := range got {
				require.Equal(t, string(msg(i)), r.data, "order")
				require.Equal(t, p.pub.ID(), r.publisher)
				if i%3 == 0 {
					assert.Equal(t, fmt.Sprint("k", i), r.key)
					assert.Equal(t, pubsub.Header{"i": {fmt.Sprint(i)}}, r.header)
				} else {
					assert.Empty(t, r.key)
					assert.Nil(t, r.header)
				}
			}
		})
	}
}

func TestInvalidHeaderNamesAreRejectedWhole(t *testing.T) {
	c := newCluster(t, 3, 2)
	topic := ownedBy(t, c.Nodes[1], "bad-header")
	var e envelopes
	subscribe(t, c.Nodes[0], topic, e.handler)
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	for name, key := range map[string]string{
		"empty": "", "space": "a b", "colon": "a:b", "tab": "a\tb", "newline": "a\nb",
		"NUL": "a\x00b", "DEL": "a\x7fb", "non-breaking space": "a\u00a0b", "not UTF-8": "a\xffb",
	} {
		t.Run(name, func(t *testing.T) {
			msgs := []pubsub.Outgoing{{Data: []byte("fine")}, {Data: []byte("bad"), Header: pubsub.Header{key: {"v"}}}}
			ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, msgs)
			require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
			assert.Equal(t, pubsub.Rejected, ack.Status)
			assert.Equal(t, pubsub.ReasonInvalidMessage, ack.Reason)
			assert.Equal(t, 2, ack.Messages)
			assert.Contains(t, err.Error(), "header name")

			_, err = prod.ProduceMessage(ctxT(t), msgs[1]).Wait(ctxT(t))
			require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
		})
	}
	// Nothing of the rejected batches arrived: the next valid one is the
	// first message the subscriber sees.
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("valid"), Header: pubsub.Header{"ok-name_1.x": {"v"}}}})
	mustAccept(t, ack, err, 1)
	got := e.all()
	require.Len(t, got, 1)
	assert.Equal(t, "valid", got[0].data)
}

func TestKeysAndHeadersCountTowardsMaxMessageSize(t *testing.T) {
	c := newCluster(t, 3, 2)
	topic := ownedBy(t, c.Nodes[1], "size")
	limit := c.Nodes[0].MaxMessageSize()
	data := make([]byte, limit-8)
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	for name, m := range map[string]pubsub.Outgoing{
		"key":    {Data: data, Key: "0123456789"},
		"header": {Data: data, Header: pubsub.Header{"h": {"0123456789"}}},
	} {
		t.Run(name, func(t *testing.T) {
			ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{m})
			require.ErrorIs(t, err, pubsub.ErrTooLarge)
			assert.Equal(t, pubsub.ReasonTooLarge, ack.Reason)
			_, err = prod.ProduceMessage(ctxT(t), m).Wait(ctxT(t))
			require.ErrorIs(t, err, pubsub.ErrTooLarge)
		})
	}
	// The same bytes without them fit.
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: data}})
	mustAccept(t, ack, err, 0)
}

// traceKey carries the test propagator's value in a ctx.
type traceKey struct{}

// testPropagator carries ctx's traceKey value in the "trace" header.
type testPropagator struct{ injected, extracted sync.Map }

func (p *testPropagator) Inject(ctx context.Context, h pubsub.Header) {
	if h == nil {
		panic("Inject got a nil Header")
	}
	if v, ok := ctx.Value(traceKey{}).(string); ok {
		h.Set("trace", v)
		p.injected.Store(v, true)
	}
}

func (p *testPropagator) Extract(ctx context.Context, h pubsub.Header) context.Context {
	if v := h.Get("trace"); v != "" {
		p.extracted.Store(v, true)
		return context.WithValue(ctx, traceKey{}, v)
	}
	return ctx
}

func TestPropagatorCarriesContextAcrossNodes(t *testing.T) {
	prop := &testPropagator{}
	c := newCluster(t, 3, 3, pubsub.WithPropagator(prop))
	topic := ownedBy(t, c.Nodes[1], "traced")
	var e envelopes
	subscribe(t, c.Nodes[2], topic, e.handler)
	traced := func(v string) context.Context { return context.WithValue(ctxT(t), traceKey{}, v) }

	ack, err := c.Nodes[0].Publish(traced("publish"), topic, []byte("a"))
	mustAccept(t, ack, err, 1)
	ack, err = c.Nodes[0].PublishBatch(traced("batch"), topic, [][]byte{[]byte("b1"), []byte("b2")})
	mustAccept(t, ack, err, 1)
	own := pubsub.Header{"mine": {"1"}}
	ack, err = c.Nodes[0].PublishMessages(traced("messages"), topic, []pubsub.Outgoing{{Data: []byte("c"), Key: "k", Header: own}})
	mustAccept(t, ack, err, 1)
	assert.Equal(t, pubsub.Header{"mine": {"1"}}, own, "Inject adds to a copy: the caller's header is unchanged")

	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{MaxInFlight: 2})
	require.NoError(t, err)
	f1 := prod.Produce(traced("produce-1"), []byte("d1"))
	f2 := prod.ProduceMessage(traced("produce-2"), pubsub.Outgoing{Data: []byte("d2"), Header: pubsub.Header{"mine": {"2"}}})
	for _, f := range []*pubsub.Produced{f1, f2} {
		ack, err := f.Wait(ctxT(t))
		require.NoError(t, err)
		require.Equal(t, 1, ack.Delivered)
	}
	require.NoError(t, prod.Close(ctxT(t)))
	// A message published without a value in its ctx carries none.
	ack, err = c.Nodes[0].Publish(ctxT(t), topic, []byte("untraced"))
	mustAccept(t, ack, err, 1)

	got := e.all()
	require.Len(t, got, 7)
	for i, want := range []string{"publish", "batch", "batch", "messages", "produce-1", "produce-2", ""} {
		assert.Equal(t, want, got[i].trace, "message %d (%s): the handler's ctx carries the publisher's value", i, got[i].data)
	}
	assert.Equal(t, "k", got[3].key)
	assert.Equal(t, "1", got[3].header.Get("mine"))
	assert.Equal(t, "2", got[5].header.Get("mine"))
	assert.Nil(t, got[6].header, "nothing injected: no header")
}

// A batch in a packed format this node does not know (a newer node's) is
// counted as malformed and answered as a bad request; the node keeps
// serving. A node that knows only format 1 sees a format 2 batch the same
// way: count messages and no packed field.
func TestBatchInAnUnknownFormatIsMalformed(t *testing.T) {
	c := newCluster(t, 3, 2)
	owner := c.Nodes[1]
	topic := ownedBy(t, owner, "future-format")
	var e envelopes
	subscribe(t, c.Nodes[0], topic, e.handler)
	head, err := proto.Marshal(&wire.PublishRequest{From: &wire.MemberRef{NodeId: c.Nodes[0].ID(), Incarnation: 1}, Topic: topic, Count: 2})
	require.NoError(t, err)
	body := protowire.AppendTag(head, 99, protowire.BytesType) // a future format's packed field
	body = protowire.AppendBytes(body, []byte{0x02, 'a', 0x02, 'b'})
	env := protowire.AppendTag(nil, 3, protowire.BytesType) // Envelope.publish
	env = protowire.AppendBytes(env, body)
	nc := c.Connect(t, 0)
	defer nc.Close()
	before := owner.Stats().Malformed
	reply, err := nc.Request("pubsub.node."+owner.ID(), env, 5*time.Second)
	require.NoError(t, err)
	var rep wire.Envelope
	require.NoError(t, proto.Unmarshal(reply.Data, &rep))
	assert.Equal(t, wire.Reply_BAD_REQUEST, rep.GetReply().GetCode())
	assert.Equal(t, before+1, owner.Stats().Malformed)
	assert.Empty(t, e.all(), "nothing of it was delivered")
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("after"), Key: "k"}})
	mustAccept(t, ack, err, 1)
}

func TestHeaderMethods(t *testing.T) {
	var none pubsub.Header
	assert.Equal(t, "", none.Get("x"), "a nil Header reads as empty")
	assert.Nil(t, none.Values("x"))
	h := pubsub.Header{}
	h.Set("a", "1")
	h.Add("a", "2")
	h.Add("b", "3")
	assert.Equal(t, "1", h.Get("a"))
	assert.Equal(t, []string{"1", "2"}, h.Values("a"))
	h.Set("a", "4")
	assert.Equal(t, []string{"4"}, h.Values("a"))
	h.Del("a")
	assert.Equal(t, pubsub.Header{"b": {"3"}}, h)
	assert.Equal(t, "", h.Get("B"), "names are case-sensitive")
}

// badPropagator injects a header name that is not allowed.
type badPropagator struct{}

func (badPropagator) Inject(_ context.Context, h pubsub.Header) { h.Set("bad name", "v") }
func (badPropagator) Extract(ctx context.Context, _ pubsub.Header) context.Context {
	return ctx
}

// Names a Propagator injects are checked like the caller's.
func TestPropagatorInjectingAnInvalidNameIsRefused(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithPropagator(badPropagator{}))
	_, err := c.Nodes[0].Publish(ctxT(t), "t", []byte("x"))
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	assert.Contains(t, err.Error(), "Propagator")
	_, err = c.Nodes[0].PublishMessages(ctxT(t), "t", []pubsub.Outgoing{{Data: []byte("x")}})
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
	prod, err := pubsub.NewBatchingProducer(c.Nodes[0], "t", pubsub.ProducerConfig{})
	require.NoError(t, err)
	defer func() { require.NoError(t, prod.Close(ctxT(t))) }()
	_, err = prod.Produce(ctxT(t), []byte("x")).Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrInvalidMessage)
}

// panickingPropagator is testPropagator whose Extract panics on a message
// carrying a "poison" header, as a third-party propagator might on a
// malformed trace header it did not write.
type panickingPropagator struct{ testPropagator }

func (p *panickingPropagator) Extract(ctx context.Context, h pubsub.Header) context.Context {
	if h.Get("poison") != "" {
		panic("malformed trace header")
	}
	return p.testPropagator.Extract(ctx, h)
}

// A panic in Extract runs on the subscriber's mailbox goroutine, where it
// would take the node down: the handler gets the message without its trace
// context instead, the rest of the batch keeps its own, and it is logged.
func TestPropagatorExtractPanicCostsOnlyTheTraceContext(t *testing.T) {
	logs := &syncBuffer{}
	c := newCluster(t, 3, 3, pubsub.WithPropagator(&panickingPropagator{}), warnLogger(logs))
	for name, p := range envelopePaths(t, c, "extract-panic") {
		t.Run(name, func(t *testing.T) {
			var e envelopes
			subscribe(t, p.sub, p.topic, e.handler)
			ctx := context.WithValue(ctxT(t), traceKey{}, "t-"+name)
			ack, err := p.pub.PublishMessages(ctx, p.topic, []pubsub.Outgoing{
				{Data: []byte("before")},
				{Data: []byte("poisoned"), Header: pubsub.Header{"poison": {"1"}}},
				{Data: []byte("after")},
			})
			mustAccept(t, ack, err, 1)
			got := e.all()
			require.Len(t, got, 3, "every message reached the handler")
			assert.Equal(t, []string{"before", "poisoned", "after"}, []string{got[0].data, got[1].data, got[2].data})
			assert.Equal(t, "t-"+name, got[0].trace)
			assert.Empty(t, got[1].trace, "the poisoned message's handler got the ctx without a trace")
			assert.Equal(t, "t-"+name, got[2].trace, "the next message extracts again")
			assert.Contains(t, logs.String(), "Propagator.Extract panicked")
		})
	}
}
