package pubsub_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Metadata integrity across every path a message takes: each message has a
// unique id in its Data, a key and header derived from that id (or none),
// and the trace its publishing call carried; every handler checks that the
// message it got carries exactly that, attached to that message.

// mdWant is what one message must arrive with.
type mdWant struct {
	sum       [32]byte // of Data
	key       string
	header    pubsub.Header
	publisher string
	trace     string // the propagator's value in the handler's ctx
}

type mdProbe struct {
	mu   sync.Mutex
	want map[string]mdWant
	seen map[string]map[string]int // label -> id -> runs
	bad  []string
	// prop tells the nodes that inject (the others publish untraced).
	prop map[string]bool
}

func newMDProbe() *mdProbe {
	return &mdProbe{want: map[string]mdWant{}, seen: map[string]map[string]int{}, prop: map[string]bool{}}
}

// mdMessage returns message i of a batch, with the key and header it carries,
// cycling through: a header map shared by several messages (back-references
// in the packed batch, with a key, across a key-only message), a key only,
// nothing, a header of the message's own (case-differing names, several
// values in order, empty values, raw bytes in a value, a name without
// values, a non-ASCII name; every other one with 40
// names more), and equal headers in separate maps.
func mdMessage(id string, i int, shared pubsub.Header, pad int) pubsub.Outgoing {
	data := []byte("id=" + id + ";")
	if pad > len(data) {
		fill := make([]byte, pad-len(data))
		for j := range fill {
			fill[j] = id[j%len(id)]
		}
		data = append(data, fill...)
	}
	m := pubsub.Outgoing{Data: data}
	switch i % 8 {
	case 0:
		m.Key, m.Header = "k-"+id, shared
	case 1, 3:
		m.Header = shared
	case 2:
		m.Key = "k-" + id
	case 4:
	case 5:
		m.Key = "kk-" + id
		m.Header = pubsub.Header{"id": {id}, "Id": {"upper:" + id}, "ID": {""}, "multi": {"a-" + id, "", "c-" + id, "a-" + id},
			"empty": {""}, "ünï": {"u-" + id}, "raw": {"\r\n: \x00\xff" + id}, "novalues": {}}
		if i%16 == 5 {
			for k := range 40 {
				m.Header[fmt.Sprintf("n%02d", k)] = []string{fmt.Sprint(k, "-", id)}
			}
		}
	case 6, 7:
		m.Header = pubsub.Header{"eq": {"same", "two"}, "Eq": {"other"}}
	}
	return m
}

func mdShared() pubsub.Header {
	return pubsub.Header{"shared": {"s1", "s2"}, "Shared": {"S"}, "blank": {""}}
}

// batch makes n messages with ids prefix-0.. and records them as sent by
// node with trace tr.
func (p *mdProbe) batch(node *pubsub.Node, tr, prefix string, n, pad int) []pubsub.Outgoing {
	shared := mdShared()
	out := make([]pubsub.Outgoing, n)
	for i := range out {
		id := fmt.Sprintf("%s-%d", prefix, i)
		out[i] = mdMessage(id, i, shared, pad)
		p.expect(node, tr, id, out[i])
	}
	return out
}

// expect records m as sent by node with trace tr.
func (p *mdProbe) expect(node *pubsub.Node, tr, id string, m pubsub.Outgoing) {
	w := mdWant{sum: sha256.Sum256(m.Data), key: m.Key, publisher: node.ID()}
	if len(m.Header) > 0 {
		w.header = pubsub.Header{}
		for k, vs := range m.Header {
			w.header[k] = slices.Clone(vs)
		}
	}
	if p.prop[node.ID()] && tr != "" {
		if w.header == nil {
			w.header = pubsub.Header{}
		}
		w.header["trace"] = []string{tr}
		w.trace = tr
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, dup := p.want[id]; dup {
		panic("id used twice: " + id)
	}
	p.want[id] = w
}

func mdID(data []byte) string {
	s := string(data)
	if !strings.HasPrefix(s, "id=") {
		return ""
	}
	s = s[3:]
	if i := strings.IndexByte(s, ';'); i >= 0 {
		return s[:i]
	}
	return ""
}

func traced(ctx context.Context, tr string) context.Context {
	if tr == "" {
		return ctx
	}
	return context.WithValue(ctx, traceKey{}, tr)
}

// handler checks each message against what was sent with its id and
// counts it under label (a group's members share one).
func (p *mdProbe) handler(label string) pubsub.Handler {
	return func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data) != "probe" { // publishUntilAccepted's
			p.check(ctx, label, mdID(m.Data), m)
		}
		return nil
	}
}

func (p *mdProbe) check(ctx context.Context, label, id string, m *pubsub.Message) {
	tr, _ := ctx.Value(traceKey{}).(string)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen[label] == nil {
		p.seen[label] = map[string]int{}
	}
	p.seen[label][id]++
	w, ok := p.want[id]
	var errs []string
	switch {
	case !ok:
		errs = append(errs, "unknown id")
	default:
		if sha256.Sum256(m.Data) != w.sum {
			errs = append(errs, fmt.Sprintf("data differs (%d bytes)", len(m.Data)))
		}
		if m.Key != w.key {
			errs = append(errs, fmt.Sprintf("key %q, want %q", m.Key, w.key))
		}
		if !mdHeaderEqual(m.Header, w.header) {
			errs = append(errs, fmt.Sprintf("header %v, want %v", m.Header, w.header))
		}
		if m.Publisher != w.publisher {
			errs = append(errs, fmt.Sprintf("publisher %q, want %q", m.Publisher, w.publisher))
		}
		if tr != w.trace {
			errs = append(errs, fmt.Sprintf("ctx trace %q, want %q", tr, w.trace))
		}
	}
	for _, e := range errs {
		if len(p.bad) < 50 {
			p.bad = append(p.bad, fmt.Sprintf("%s: message %q: %s", label, id, e))
		}
	}
}

// mdHeaderEqual: same names (case-sensitive), same values in order; a
// message without a header arrives with a nil one.
func mdHeaderEqual(got, want pubsub.Header) bool {
	if (got == nil) != (want == nil) || len(got) != len(want) {
		return false
	}
	for k, vs := range want {
		gv, ok := got[k]
		if !ok || !slices.Equal(gv, vs) {
			return false
		}
	}
	return true
}

func (p *mdProbe) count(label, id string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen[label][id]
}

// wait waits until every label has run every id of msgs at least once.
func (p *mdProbe) wait(t *testing.T, msgs []pubsub.Outgoing, labels ...string) {
	t.Helper()
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		for _, l := range labels {
			for _, m := range msgs {
				if p.count(l, mdID(m.Data)) == 0 {
					return false
				}
			}
		}
		return true
	}, "not every message reached %v", labels)
}

// once asserts every id of msgs ran exactly once under each label.
func (p *mdProbe) once(t *testing.T, msgs []pubsub.Outgoing, labels ...string) {
	t.Helper()
	for _, l := range labels {
		for _, m := range msgs {
			if k := p.count(l, mdID(m.Data)); k != 1 {
				t.Errorf("%s ran %s %d times, want once", l, mdID(m.Data), k)
			}
		}
	}
}

func (p *mdProbe) verify(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range p.bad {
		t.Error(b)
	}
	p.bad = nil
}

func mdSubscribe(t *testing.T, n *pubsub.Node, topic string, h pubsub.Handler, opts ...pubsub.SubscribeOption) *pubsub.Subscription {
	t.Helper()
	s, err := n.Subscribe(ctxT(t), topic, h, opts...)
	require.NoError(t, err)
	return s
}

func TestMetadataIntegrityOnEveryPath(t *testing.T) {
	leakcheck.Parallel(t)
	prop := &testPropagator{}
	alo := func(topic string) pubsub.DeliveryMode {
		if strings.HasPrefix(topic, "alo") {
			return pubsub.AtLeastOnce
		}
		return pubsub.AtMostOnce
	}
	opts := append(append([]pubsub.Option{}, fast...), pubsub.WithDeliveryMode(alo))
	c := testcluster.NewFaulty(t, 3, 3, append(slices.Clone(opts), pubsub.WithPropagator(prop))...)
	// np publishes without a propagator: its shared header maps travel as
	// back-references.
	np := c.AddNode(t, "np", 0, opts...)
	c.WaitConverged(t, 10*time.Second)
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	p := newMDProbe()
	for _, n := range []*pubsub.Node{n0, n1, n2} {
		p.prop[n.ID()] = true
	}
	t.Cleanup(func() { p.verify(t) })
	ctx := ctxT(t)
	limit := n0.MaxMessageSize()

	// Plain batches beside the messages: a Publish of bytes only, with the
	// propagator's one header for all of them.
	plain := func(node *pubsub.Node, tr, prefix string, n int) [][]byte {
		out := make([][]byte, n)
		for i := range out {
			id := fmt.Sprintf("%s-%d", prefix, i)
			out[i] = []byte("id=" + id + ";")
			p.expect(node, tr, id, pubsub.Outgoing{Data: out[i]})
		}
		return out
	}
	asOutgoing := func(data [][]byte) []pubsub.Outgoing {
		out := make([]pubsub.Outgoing, len(data))
		for i, d := range data {
			out[i].Data = d
		}
		return out
	}

	for _, owner := range []int{0, 1} {
		t.Run(fmt.Sprintf("ack levels, owner n%d", owner), func(t *testing.T) {
			topic := ownedBy(t, c.Nodes[owner], fmt.Sprintf("md-levels-%d", owner))
			mdSubscribe(t, n0, topic, p.handler(topic+"/n0"))
			mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
			labels := []string{topic + "/n0", topic + "/n2"}
			var all []pubsub.Outgoing
			for r, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
				for _, pub := range []*pubsub.Node{n0, np} {
					for k := range 4 {
						pre := fmt.Sprintf("%s-%d-%s-%d", topic, r, pub.ID(), k)
						tr := "tr-" + pre
						var ack pubsub.PublishAck
						var err error
						var sent []pubsub.Outgoing
						switch k {
						case 0, 2:
							sent = p.batch(pub, tr, pre, 19, 0)
							ack, err = pub.PublishMessages(traced(ctx, tr), topic, sent, pubsub.WithAck(level))
						case 1: // plain: merged at the owner (AckAccepted) or in np's outbox (AckNone)
							sent = asOutgoing(plain(pub, tr, pre, 5))
							ack, err = pub.PublishMessages(traced(ctx, tr), topic, sent, pubsub.WithAck(level))
						case 3:
							data := plain(pub, tr, pre, 3)
							sent = asOutgoing(data)
							if level == pubsub.AckDelivered {
								ack, err = pub.PublishBatch(traced(ctx, tr), topic, data)
							} else {
								ack, err = pub.PublishMessages(traced(ctx, tr), topic, sent, pubsub.WithAck(level))
							}
						}
						require.NoError(t, err)
						if level == pubsub.AckDelivered {
							mustAccept(t, ack, err, 2)
						}
						all = append(all, sent...)
					}
				}
			}
			p.wait(t, all, labels...)
			p.once(t, all, labels...)
			p.verify(t)
		})
	}

	t.Run("producers", func(t *testing.T) {
		topic := ownedBy(t, n1, "md-producer")
		mdSubscribe(t, n0, topic, p.handler(topic+"/n0"))
		mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
		labels := []string{topic + "/n0", topic + "/n2"}
		var all []pubsub.Outgoing
		for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
			for _, pub := range []*pubsub.Node{n0, np} {
				prod, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{BatchSize: 7, MaxBatchBytes: 3000, MaxInFlight: 4, AckLevel: level})
				require.NoError(t, err)
				pre := fmt.Sprintf("%s-%d-%s", topic, level, pub.ID())
				shared := mdShared()
				var fs []*pubsub.Produced
				for i := range 60 {
					id := fmt.Sprintf("%s-%d", pre, i)
					tr := "tr-" + id // a trace per message: the ctx given to Produce
					m := mdMessage(id, i, shared, 20+i%50)
					p.expect(pub, tr, id, m)
					if m.Key == "" && m.Header == nil && i%3 == 0 {
						fs = append(fs, prod.Produce(traced(ctx, tr), m.Data))
					} else {
						fs = append(fs, prod.ProduceMessage(traced(ctx, tr), m))
					}
					all = append(all, m)
				}
				for _, f := range fs {
					_, err := f.Wait(ctx)
					require.NoError(t, err)
				}
				require.NoError(t, prod.Close(ctx))
			}
		}
		p.wait(t, all, labels...)
		p.once(t, all, labels...)
		p.verify(t)
	})

	t.Run("split batches", func(t *testing.T) {
		topic := ownedBy(t, n1, "md-split")
		mdSubscribe(t, n0, topic, p.handler(topic+"/n0"))
		mdSubscribe(t, n1, topic, p.handler(topic+"/n1"))
		mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
		labels := []string{topic + "/n0", topic + "/n1", topic + "/n2"}
		var all []pubsub.Outgoing
		for _, pub := range []*pubsub.Node{n0, np} {
			// Messages of a third of the limit with a header each: chunks of
			// two, the shared header's first in a chunk in full.
			pre := topic + "-" + pub.ID()
			tr := "tr-" + pre
			msgs := p.batch(pub, tr, pre, 8, limit/3)
			ack, err := pub.PublishMessages(traced(ctx, tr), topic, msgs)
			mustAccept(t, ack, err, 3)
			all = append(all, msgs...)
			// One message exactly at the limit with its key and header,
			// between two small ones: nothing of it is cut.
			id := pre + "-max"
			m := pubsub.Outgoing{Key: "k-" + id, Header: pubsub.Header{"big": {strings.Repeat("v", 1000), ""}, "Big": {"x"}}}
			full := pubsub.Header{}
			for k, vs := range m.Header {
				full[k] = vs
			}
			if p.prop[pub.ID()] {
				full["trace"] = []string{tr}
			}
			size := wire.MetaSize(wire.NewMeta(m.Key, full))
			m.Data = append([]byte("id="+id+";"), make([]byte, limit-size-len(id)-4)...)
			p.expect(pub, tr, id, m)
			edge := []pubsub.Outgoing{msgs[0], m, msgs[1]}
			edge[0].Data, edge[2].Data = []byte("id="+id+"a;"), []byte("id="+id+"b;")
			p.expect(pub, tr, id+"a", edge[0])
			p.expect(pub, tr, id+"b", edge[2])
			ack, err = pub.PublishMessages(traced(ctx, tr), topic, edge)
			mustAccept(t, ack, err, 3)
			all = append(all, edge...)
			// One byte more is refused whole, nothing cut.
			over := m
			over.Header = pubsub.Header{"big": {strings.Repeat("v", 1001), ""}, "Big": {"x"}}
			ack, err = pub.PublishMessages(traced(ctx, tr), topic, []pubsub.Outgoing{over})
			require.ErrorIs(t, err, pubsub.ErrTooLarge)
			require.Equal(t, pubsub.ReasonTooLarge, ack.Reason)
			// A producer whose MaxBatchBytes is above the node's limit: its
			// batches are split into chunks.
			prod, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{MaxBatchBytes: 3 * limit, MaxInFlight: 2})
			require.NoError(t, err)
			ppre := pre + "-prod"
			shared := mdShared()
			var fs []*pubsub.Produced
			for i := range 9 {
				id := fmt.Sprintf("%s-%d", ppre, i)
				m := mdMessage(id, i, shared, limit/4)
				p.expect(pub, tr, id, m)
				fs = append(fs, prod.ProduceMessage(traced(ctx, tr), m))
				all = append(all, m)
			}
			// A message exactly at the limit through the producer too.
			atMax := m
			atMax.Data = append([]byte("id="+id+"p;"), make([]byte, len(m.Data)-len(id)-5)...)
			p.expect(pub, tr, id+"p", atMax)
			fs = append(fs, prod.ProduceMessage(traced(ctx, tr), atMax))
			all = append(all, atMax)
			f := prod.ProduceMessage(traced(ctx, tr), over)
			for _, f := range fs {
				ack, err := f.Wait(ctx)
				require.NoError(t, err)
				require.Equal(t, 3, ack.Delivered)
			}
			_, err = f.Wait(ctx)
			require.ErrorIs(t, err, pubsub.ErrTooLarge)
			require.NoError(t, prod.Close(ctx))
		}
		p.wait(t, all, labels...)
		p.once(t, all, labels...)
		p.verify(t)
	})

	t.Run("groups", func(t *testing.T) {
		for _, owner := range []int{0, 1} {
			topic := ownedBy(t, c.Nodes[owner], fmt.Sprintf("md-group-%d", owner))
			for _, n := range []*pubsub.Node{n0, n1, n2} {
				mdSubscribe(t, n, topic, p.handler(topic+"/g"), pubsub.WithGroup("g"))
			}
			mdSubscribe(t, n2, topic, p.handler(topic+"/b2"))
			var all []pubsub.Outgoing
			for _, pub := range []*pubsub.Node{n0, np} {
				for k := range 3 {
					pre := fmt.Sprintf("%s-%s-%d", topic, pub.ID(), k)
					tr := "tr-" + pre
					msgs := p.batch(pub, tr, pre, 24, 0)
					ack, err := pub.PublishMessages(traced(ctx, tr), topic, msgs)
					mustAccept(t, ack, err, 2)
					all = append(all, msgs...)
				}
			}
			p.wait(t, all, topic+"/g", topic+"/b2")
			p.once(t, all, topic+"/g", topic+"/b2")
		}
		p.verify(t)
	})

	t.Run("group re-route on a full mailbox", func(t *testing.T) {
		for _, freeOn := range []int{0, 2} { // the owner's node, another
			topic := ownedBy(t, n0, fmt.Sprintf("md-reroute-%d", freeOn))
			label := topic + "/g"
			release := make(chan struct{})
			unblock := sync.OnceFunc(func() { close(release) })
			t.Cleanup(unblock)
			started := make(chan struct{}, 64)
			blocked := mdSubscribe(t, n1, topic, func(ctx context.Context, m *pubsub.Message) error {
				started <- struct{}{}
				<-release
				p.check(ctx, label, mdID(m.Data), m)
				return nil
			}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
			mdSubscribe(t, c.Nodes[freeOn], topic, p.handler(label), pubsub.WithGroup("g"))
			var all []pubsub.Outgoing
			for k := range 3 {
				pub := []*pubsub.Node{n0, np}[k%2]
				pre := fmt.Sprintf("%s-%d", topic, k)
				tr := "tr-" + pre
				msgs := p.batch(pub, tr, pre, 16, 0)
				all = append(all, msgs...)
				if k < 2 { // one running in the blocked handler, one queued
					_, err := pub.PublishMessages(traced(ctx, tr), topic, msgs, pubsub.WithAck(pubsub.AckAccepted))
					require.NoError(t, err)
					if k == 0 {
						<-started
					} else {
						testcluster.WaitFor(t, 5*time.Second, func() bool { return n1.Stats().MaxMailboxDepth >= 1 }, "second batch never queued")
					}
					continue
				}
				ack, err := pub.PublishMessages(traced(ctx, tr), topic, msgs)
				mustAccept(t, ack, err, 1) // the blocked member's share went to the free one
			}
			unblock()
			p.wait(t, all, label)
			p.once(t, all, label)
			require.NoError(t, blocked.Unsubscribe(ctx))
		}
		p.verify(t)
	})

	t.Run("group re-route of the rest of a share", func(t *testing.T) {
		// A member ending mid-share reports how many messages it ran; only
		// the rest is re-routed, by their indices in the whole batch (its
		// node was sent its share alone).
		topic := ownedBy(t, n0, "md-partial")
		label := topic + "/g"
		started, release := make(chan struct{}), make(chan struct{})
		free := sync.OnceFunc(func() { close(release) })
		t.Cleanup(free)
		var first sync.Once
		leaving := mdSubscribe(t, n1, topic, func(ctx context.Context, m *pubsub.Message) error {
			p.check(ctx, label, mdID(m.Data), m)
			first.Do(func() { close(started); <-release })
			return nil
		}, pubsub.WithGroup("g"))
		mdSubscribe(t, n2, topic, p.handler(label), pubsub.WithGroup("g"))
		pre := topic + "-0"
		tr := "tr-" + pre
		msgs := p.batch(np, tr, pre, 24, 0)
		done := make(chan error, 1)
		go func() {
			ack, err := np.PublishMessages(traced(context.Background(), tr), topic, msgs)
			if err == nil && (ack.Delivered != 1 || len(ack.Failures) != 0) {
				err = fmt.Errorf("ack %+v", ack)
			}
			done <- err
		}()
		<-started
		require.NoError(t, leaving.Unsubscribe(ctx))
		free()
		require.NoError(t, <-done)
		p.once(t, msgs, label)
		p.verify(t)
	})

	t.Run("at-least-once re-sends and re-route", func(t *testing.T) {
		topic := ownedBy(t, n1, "alo-md")
		label := topic + "/g"
		release := make(chan struct{})
		unblock := sync.OnceFunc(func() { close(release) })
		t.Cleanup(unblock)
		// The slow member holds its share past SubscriberTimeout (its node
		// is re-sent copies meanwhile); the share is re-routed to the other.
		mdSubscribe(t, n2, topic, func(ctx context.Context, m *pubsub.Message) error {
			<-release
			p.check(ctx, label, mdID(m.Data), m)
			return nil
		}, pubsub.WithGroup("g"))
		mdSubscribe(t, n0, topic, p.handler(label), pubsub.WithGroup("g"))
		mdSubscribe(t, n2, topic, p.handler(topic+"/b2"))
		pre := topic + "-0"
		tr := "tr-" + pre
		msgs := p.batch(np, tr, pre, 16, 0) // np: the shared header as back-references
		ack, err := np.PublishMessages(traced(ctx, tr), topic, msgs)
		mustAccept(t, ack, err, 2)
		p.wait(t, msgs, label, topic+"/b2")
		unblock()
		p.once(t, msgs, topic+"/b2")
		p.verify(t)
	})

	t.Run("typed topic", func(t *testing.T) {
		type order struct {
			ID   string
			Item string
		}
		name := ownedBy(t, n1, "md-typed")
		label := name + "/n2"
		check := func(ctx context.Context, v order, m *pubsub.Message) error {
			p.check(ctx, label, v.ID, m)
			return nil
		}
		var ids []string
		expect := func(node *pubsub.Node, tr string, v order, m pubsub.Outgoing) {
			m.Data, _ = json.Marshal(v)
			p.expect(node, tr, v.ID, m)
			ids = append(ids, v.ID)
		}
		for _, pub := range []*pubsub.Node{n0, np} {
			topic, err := pubsub.NewTopic(pub, name, pubsub.JSONCodec[order]())
			require.NoError(t, err)
			if pub == n0 {
				sub, err := pubsub.NewTopic(n2, name, pubsub.JSONCodec[order]())
				require.NoError(t, err)
				_, err = sub.Subscribe(ctx, check)
				require.NoError(t, err)
			}
			shared := mdShared()
			for i := range 8 {
				v := order{ID: fmt.Sprintf("%s-%s-%d", name, pub.ID(), i), Item: "w"}
				tr := "tr-" + v.ID
				m := mdMessage(v.ID, i, shared, 0)
				expect(pub, tr, v, m)
				ack, err := topic.PublishMessage(traced(ctx, tr), v, pubsub.Outgoing{Key: m.Key, Header: m.Header})
				mustAccept(t, ack, err, 1)
			}
			prod, err := pubsub.NewTypedProducer(topic, pubsub.ProducerConfig{BatchSize: 3})
			require.NoError(t, err)
			var fs []*pubsub.Produced
			for i := range 16 {
				v := order{ID: fmt.Sprintf("%s-%s-p%d", name, pub.ID(), i), Item: "w"}
				tr := "tr-" + v.ID
				m := mdMessage(v.ID, i, shared, 0)
				expect(pub, tr, v, m)
				fs = append(fs, prod.ProduceMessage(traced(ctx, tr), v, pubsub.Outgoing{Key: m.Key, Header: m.Header}))
			}
			for _, f := range fs {
				_, err := f.Wait(ctx)
				require.NoError(t, err)
			}
			require.NoError(t, prod.Close(ctx))
			big := order{ID: "big", Item: strings.Repeat("x", limit)}
			_, err = topic.PublishMessage(ctx, big, pubsub.Outgoing{})
			require.ErrorIs(t, err, pubsub.ErrTooLarge)
		}
		testcluster.WaitFor(t, 10*time.Second, func() bool {
			for _, id := range ids {
				if p.count(label, id) == 0 {
					return false
				}
			}
			return true
		}, "typed messages missing")
		p.verify(t)
	})

	t.Run("producer retry after an unknown outcome", func(t *testing.T) {
		topic := ownedBy(t, n1, "md-retry")
		mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
		timedOut := make(chan struct{}, 16)
		prod, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{BatchSize: 40, MaxInFlight: 1, PublishTimeout: 300 * time.Millisecond,
			OnPublishError: func(_ int, err error) pubsub.ErrorDecision {
				if errors.Is(err, pubsub.ErrTimeout) {
					select {
					case timedOut <- struct{}{}:
					default:
					}
				}
				return pubsub.RetryBatch(20 * time.Millisecond)
			}})
		require.NoError(t, err)
		// Initialized first: an Initialize times out too while stalled.
		warm := pubsub.Outgoing{Data: []byte("id=" + topic + "-warm;"), Key: "w"}
		p.expect(n0, "", topic+"-warm", warm)
		_, err = prod.ProduceMessage(ctx, warm).Wait(ctx)
		require.NoError(t, err)
		// The owner's answers to n0 are held: the batch reaches n2, its
		// attempt times out and is retried once the route heals.
		c.StallRoute(1, 0)
		healed := sync.OnceFunc(c.HealAll)
		t.Cleanup(healed)
		pre := topic + "-0"
		shared := mdShared()
		var msgs []pubsub.Outgoing
		var fs []*pubsub.Produced
		for i := range 40 {
			id := fmt.Sprintf("%s-%d", pre, i)
			tr := "tr-" + id
			m := mdMessage(id, i, shared, 0)
			p.expect(n0, tr, id, m)
			fs = append(fs, prod.ProduceMessage(traced(ctx, tr), m))
			msgs = append(msgs, m)
		}
		select {
		case <-timedOut:
		case <-ctx.Done():
			t.Fatal("no attempt timed out")
		}
		// The first batch reached n2 before its attempt timed out.
		p.wait(t, msgs[:1], topic+"/n2")
		healed()
		for _, f := range fs {
			ack, err := f.Wait(ctx)
			require.NoError(t, err)
			require.Equal(t, 1, ack.Delivered)
		}
		require.NoError(t, prod.Close(ctx))
		p.once(t, msgs, topic+"/n2")
		p.verify(t)
	})

	t.Run("invalid headers are refused whole", func(t *testing.T) {
		topic := ownedBy(t, n1, "md-invalid")
		mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
		many := pubsub.Header{}
		for k := range wire.MaxHeaderNames + 1 {
			many[fmt.Sprint("h", k)] = []string{"v"}
		}
		prod, err := pubsub.NewBatchingProducer(n0, topic, pubsub.ProducerConfig{})
		require.NoError(t, err)
		defer prod.Close(ctx)
		for i, h := range []pubsub.Header{{"": {"v"}}, {"a b": {"v"}}, {"a:b": {"v"}}, {"a\x01": {"v"}}, {"\t": {"v"}}, {"ü ber": {"v"}}, {"\xff": {"v"}}, {"a\u00a0b": {"v"}}, many} {
			ok := pubsub.Outgoing{Data: []byte(fmt.Sprintf("id=%s-never-%d;", topic, i))}
			ack, err := n0.PublishMessages(ctx, topic, []pubsub.Outgoing{ok, {Data: []byte("x"), Header: h}})
			require.ErrorIs(t, err, pubsub.ErrInvalidMessage, "header %d", i)
			require.Equal(t, pubsub.ReasonInvalidMessage, ack.Reason)
			_, err = prod.ProduceMessage(ctx, pubsub.Outgoing{Data: []byte("x"), Header: h}).Wait(ctx)
			require.ErrorIs(t, err, pubsub.ErrInvalidMessage, "header %d", i)
		}
		// The most names a header may have arrive, every one.
		delete(many, "h0")
		pre := topic + "-max"
		m := pubsub.Outgoing{Data: []byte("id=" + pre + ";"), Header: many}
		p.expect(n0, "", pre, m)
		ack, err := n0.PublishMessages(ctx, topic, []pubsub.Outgoing{m})
		mustAccept(t, ack, err, 1)
		p.once(t, []pubsub.Outgoing{m}, topic+"/n2")
		p.verify(t)
	})

	t.Run("ownership move", func(t *testing.T) {
		var topics []string
		for i := range 32 {
			topic := fmt.Sprintf("md-move-%d", i)
			topics = append(topics, topic)
			mdSubscribe(t, n0, topic, p.handler(topic+"/n0"))
			mdSubscribe(t, n2, topic, p.handler(topic+"/n2"))
		}
		nm := c.AddNode(t, "nm", 1, append(slices.Clone(opts), pubsub.WithPropagator(prop))...)
		p.mu.Lock()
		p.prop[nm.ID()] = true
		p.mu.Unlock()
		c.WaitConverged(t, 10*time.Second)
		moved := 0
		for _, topic := range topics {
			if m, _ := nm.OwnerOf(topic); m.ID != nm.ID() {
				continue
			}
			moved++
			for _, pub := range []*pubsub.Node{n0, np, nm} {
				pre := topic + "-" + pub.ID()
				tr := "tr-" + pre
				msgs := p.batch(pub, tr, pre, 16, 0)
				publishUntilAccepted(t, pub, topic, []byte("probe"), 2, 5*time.Second)
				ack, err := pub.PublishMessages(traced(ctx, tr), topic, msgs)
				mustAccept(t, ack, err, 2)
				p.once(t, msgs, topic+"/n0", topic+"/n2")
			}
		}
		require.NotZero(t, moved, "the new node took none of the topics")
		p.verify(t)
	})
}
