package pubsub_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// The contract's names and signatures (DESIGN.md, "Public API" and its
// second wave), checked by the compiler as an external suite would use them:
// a rename or a changed signature stops this file from building.
var (
	_ func(context.Context, *nats.Conn, ...pubsub.Option) (*pubsub.Node, error) = pubsub.Join
	_ func(string) pubsub.Option                                                = pubsub.WithNodeID
	_ func(string) pubsub.Option                                                = pubsub.WithPrefix
	_ func(time.Duration) pubsub.Option                                         = pubsub.WithHeartbeatInterval
	_ func(time.Duration) pubsub.Option                                         = pubsub.WithMemberTimeout
	_ func(time.Duration) pubsub.Option                                         = pubsub.WithSubscriberTimeout
	_ func(time.Duration) pubsub.Option                                         = pubsub.WithRequestTimeout
	_ func(int) pubsub.Option                                                   = pubsub.WithEvictAfter
	_ func(*slog.Logger) pubsub.Option                                          = pubsub.WithLogger
	_ func(func(string) pubsub.DeliveryMode) pubsub.Option                      = pubsub.WithDeliveryMode
	_ func(pubsub.PartitionPolicy) pubsub.Option                                = pubsub.WithPartitionPolicy
	_ func(int) pubsub.Option                                                   = pubsub.WithMaxMembers
	_ func(pubsub.Propagator) pubsub.Option                                     = pubsub.WithPropagator
	_ func() pubsub.Option                                                      = pubsub.WithClientOnly
	_ func(...pubsub.Hook) pubsub.Option                                        = pubsub.WithHooks
	_ func(*pubsub.Config)                                                      = pubsub.Option(nil)

	_ func(*pubsub.Node) string                                                                                            = (*pubsub.Node).ID
	_ func(*pubsub.Node) []pubsub.Member                                                                                   = (*pubsub.Node).Members
	_ func(*pubsub.Node, string) (pubsub.Member, error)                                                                    = (*pubsub.Node).OwnerOf
	_ func(*pubsub.Node) *pubsub.EventStream                                                                               = (*pubsub.Node).Events
	_ func(*pubsub.Node, context.Context) error                                                                            = (*pubsub.Node).Close
	_ func(*pubsub.Node, context.Context) ([]pubsub.TopicInfo, error)                                                      = (*pubsub.Node).Topics
	_ func(*pubsub.Node, context.Context, string, []pubsub.Outgoing, ...pubsub.PublishOption) (pubsub.PublishAck, error)   = (*pubsub.Node).PublishMessages
	_ func(*pubsub.Node, context.Context, string, pubsub.Handler, ...pubsub.SubscribeOption) (*pubsub.Subscription, error) = (*pubsub.Node).Subscribe
	_ pubsub.Publisher                                                                                                     = (*pubsub.Node)(nil)
	_ pubsub.Initializer                                                                                                   = (*pubsub.Node)(nil)

	_ pubsub.Handler                                                                          = func(context.Context, *pubsub.Message) error { return nil }
	_ func(*pubsub.Subscription) string                                                       = (*pubsub.Subscription).Topic
	_ func(*pubsub.Subscription) pubsub.SubscriberID                                          = (*pubsub.Subscription).ID
	_ func(*pubsub.Subscription, context.Context) error                                       = (*pubsub.Subscription).Unsubscribe
	_ func(*pubsub.Subscription) <-chan struct{}                                              = (*pubsub.Subscription).Done
	_ func(*pubsub.Subscription) error                                                        = (*pubsub.Subscription).Err
	_ func(*pubsub.Subscription) string                                                       = (*pubsub.Subscription).Group
	_ func(pubsub.SubscriberID) string                                                        = pubsub.SubscriberID.String
	_ func(string) pubsub.SubscribeOption                                                     = pubsub.WithGroup
	_ func(pubsub.AckLevel) pubsub.PublishOption                                              = pubsub.WithAck
	_ func(pubsub.Reason) error                                                               = pubsub.Reason.Err
	_ func(time.Duration) pubsub.ErrorDecision                                                = pubsub.RetryBatch
	_ func(pubsub.Publisher, string, pubsub.ProducerConfig) (*pubsub.BatchingProducer, error) = pubsub.NewBatchingProducer
	_ func(*pubsub.BatchingProducer, context.Context, []byte) *pubsub.Produced                = (*pubsub.BatchingProducer).Produce
	_ func(*pubsub.BatchingProducer, context.Context, pubsub.Outgoing) *pubsub.Produced       = (*pubsub.BatchingProducer).ProduceMessage
	_ func(*pubsub.BatchingProducer, context.Context) error                                   = (*pubsub.BatchingProducer).Flush
	_ func(*pubsub.BatchingProducer, context.Context) error                                   = (*pubsub.BatchingProducer).Close
	_ func(*pubsub.Produced) <-chan struct{}                                                  = (*pubsub.Produced).Done
	_ func(*pubsub.Produced, context.Context) (pubsub.PublishAck, error)                      = (*pubsub.Produced).Wait
	_ func(*pubsub.EventStream, func(pubsub.Event)) func()                                    = (*pubsub.EventStream).Subscribe

	_ func() pubsub.Codec[int]                                                                                                                              = pubsub.JSONCodec[int]
	_ func(*pubsub.Node, string, pubsub.Codec[int]) (*pubsub.Topic[int], error)                                                                             = pubsub.NewTopic[int]
	_ func(*pubsub.Topic[int]) string                                                                                                                       = (*pubsub.Topic[int]).Name
	_ func(*pubsub.Topic[int], context.Context, int, ...pubsub.PublishOption) (pubsub.PublishAck, error)                                                    = (*pubsub.Topic[int]).Publish
	_ func(*pubsub.Topic[int], context.Context, func(context.Context, int, *pubsub.Message) error, ...pubsub.SubscribeOption) (*pubsub.Subscription, error) = (*pubsub.Topic[int]).Subscribe
	_ func(*pubsub.Topic[int], pubsub.ProducerConfig) (*pubsub.TypedProducer[int], error)                                                                   = pubsub.NewTypedProducer[int]
	_ func(*pubsub.TypedProducer[int], context.Context, int) *pubsub.Produced                                                                               = (*pubsub.TypedProducer[int]).Produce
	_ func(*pubsub.TypedProducer[int], context.Context) error                                                                                               = (*pubsub.TypedProducer[int]).Flush
	_ func(*pubsub.TypedProducer[int], context.Context) error                                                                                               = (*pubsub.TypedProducer[int]).Close

	_ pubsub.Hook = (pubsub.PublishHook)(nil)
	_ pubsub.Hook = (pubsub.HandledHook)(nil)

	_ = []error{pubsub.ErrQueueFull, pubsub.ErrTimeout, pubsub.ErrClosed, pubsub.ErrTooLarge, pubsub.ErrInvalidTopic,
		pubsub.ErrTopicUnavailable, pubsub.ErrEvicted, pubsub.ErrInvalidMessage}
	_ = []pubsub.Event{pubsub.PublishAccepted{}, pubsub.PublishRejected{}, pubsub.DeliverySucceeded{}, pubsub.DeliveryFailed{},
		pubsub.SubscriberAdded{Group: ""}, pubsub.SubscriberRemoved{Group: ""}, pubsub.SubscriberEvicted{Group: ""},
		pubsub.MemberJoined{}, pubsub.MemberLeft{}, pubsub.TopicOwnerChanged{}, pubsub.MetricsSnapshot{}, pubsub.EventsDropped{}}

	// The fields the contract names, with their types.
	_ = pubsub.Member{ID: ""}
	_ = pubsub.Message{Topic: "", Data: []byte(nil), Key: "", Header: pubsub.Header(nil), Publisher: ""}
	_ = pubsub.SubscriberID{Node: "", Local: ""}
	_ = pubsub.Outgoing{Data: []byte(nil), Key: "", Header: pubsub.Header(nil)}
	_ = pubsub.PublishAck{Topic: "", Status: pubsub.AckStatus(0), Reason: pubsub.Reason(0), Messages: 0, Delivered: 0,
		Failures: []pubsub.DeliveryFailure(nil), Level: pubsub.AckLevel(0)}
	_ = pubsub.DeliveryFailure{Subscriber: pubsub.SubscriberID{}, Status: pubsub.DeliveryStatus(0), Group: ""}
	_ = pubsub.ProducerConfig{BatchSize: 0, Linger: time.Duration(0), MaxQueueSize: 0, PublishTimeout: time.Duration(0),
		MaxInFlight: 0, OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndStop },
		AckLevel: pubsub.AckLevel(0)}
	_ = pubsub.PublishInfo{Topic: "", Messages: 0, Bytes: 0, Ack: pubsub.PublishAck{}, Err: error(nil), Duration: time.Duration(0)}
	_ = pubsub.HandledInfo{Topic: "", Subscriber: pubsub.SubscriberID{}, Group: "", Messages: 0,
		Status: pubsub.DeliveryStatus(0), Wait: time.Duration(0), Duration: time.Duration(0)}
	_                     = pubsub.TopicInfo{Topic: "", Owner: "", Subscribers: 0, Groups: map[string]int(nil)}
	_ map[string][]string = pubsub.Header(nil)
)

// TestContractValues checks the contract's values that need no cluster:
// zero values are the documented defaults, every enum names itself, every
// Reason's Err is its sentinel, and the sentinels are distinct.
func TestContractValues(t *testing.T) {
	assert.Equal(t, pubsub.AtMostOnce, pubsub.DeliveryMode(0), "AtMostOnce is the default mode")
	assert.Equal(t, pubsub.KeepServing, pubsub.PartitionPolicy(0), "KeepServing is the zero value")
	assert.Equal(t, pubsub.AckDelivered, pubsub.AckLevel(0), "AckDelivered is the zero value")
	assert.Equal(t, pubsub.Accepted, pubsub.AckStatus(0))
	assert.Equal(t, pubsub.ReasonNone, pubsub.Reason(0))
	assert.Equal(t, pubsub.FailBatchAndStop, pubsub.ErrorDecision{}, "OnPublishError's default decides the zero value")
	assert.NotEqual(t, pubsub.FailBatchAndStop, pubsub.FailBatchAndContinue)
	assert.Equal(t, pubsub.RetryBatch(time.Second), pubsub.RetryBatch(time.Second), "decisions compare by value")
	assert.NotEqual(t, pubsub.RetryBatch(time.Second), pubsub.RetryBatch(2*time.Second))
	assert.Equal(t, 3, pubsub.DefaultEvictAfter)
	assert.Equal(t, 5*time.Second, pubsub.DefaultSubscriberTimeout)
	assert.Equal(t, 5*time.Second, pubsub.DefaultRequestTimeout)
	assert.Equal(t, 1024, pubsub.DefaultMaxMembers)
	assert.Equal(t, 2000, pubsub.DefaultBatchSize)
	assert.Equal(t, 100_000, pubsub.DefaultMaxQueueSize)
	assert.Equal(t, "node-a/7", pubsub.SubscriberID{Node: "node-a", Local: "7"}.String())
	assert.Same(t, context.Canceled, pubsub.ErrCancelled) //nolint:errorlint // identity is the claim

	names := func(ss ...interface{ String() string }) {
		t.Helper()
		seen := map[string]bool{}
		for _, s := range ss {
			n := s.String()
			assert.NotEmpty(t, n)
			assert.False(t, seen[n], "%q named twice", n)
			seen[n] = true
		}
	}
	names(pubsub.AtMostOnce, pubsub.AtLeastOnce)
	names(pubsub.KeepServing, pubsub.KeepMajority)
	names(pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone)
	names(pubsub.Accepted, pubsub.Rejected)
	names(pubsub.Delivered, pubsub.SubscriberGone, pubsub.Timeout, pubsub.HandlerError, pubsub.MailboxFull, pubsub.DecodeError)

	sentinels := map[pubsub.Reason]error{
		pubsub.ReasonQueueFull:        pubsub.ErrQueueFull,
		pubsub.ReasonTimeout:          pubsub.ErrTimeout,
		pubsub.ReasonClosed:           pubsub.ErrClosed,
		pubsub.ReasonTooLarge:         pubsub.ErrTooLarge,
		pubsub.ReasonInvalidTopic:     pubsub.ErrInvalidTopic,
		pubsub.ReasonCancelled:        context.Canceled,
		pubsub.ReasonTopicUnavailable: pubsub.ErrTopicUnavailable,
		pubsub.ReasonInvalidMessage:   pubsub.ErrInvalidMessage,
	}
	require.NoError(t, pubsub.ReasonNone.Err())
	seen := map[string]bool{pubsub.ReasonNone.String(): true}
	for r, want := range sentinels {
		assert.Same(t, want, r.Err(), "%s.Err()", r) //nolint:errorlint // the sentinel itself
		assert.False(t, seen[r.String()], "%q named twice", r)
		seen[r.String()] = true
		for r2, other := range sentinels {
			if r2 != r {
				assert.NotErrorIs(t, r.Err(), other, "%s.Err() is also %s's", r, r2)
			}
		}
	}
	assert.NotErrorIs(t, pubsub.ErrEvicted, pubsub.ErrClosed)

	h := pubsub.Header{}
	h.Set("Key", "a")
	h.Add("key", "b")
	assert.Equal(t, "a", h.Get("Key"), "keys are case-sensitive")
	assert.Equal(t, []string{"b"}, h.Values("key"))
	h.Del("Key")
	assert.Empty(t, h.Get("Key"))
	var none pubsub.Header
	assert.Empty(t, none.Get("x"), "a nil Header reads as empty")
}

// auditPropagator records what Inject gets and injects nothing, so that a
// message published without a header must still arrive without one.
type auditPropagator struct {
	injects, nilHeaders atomic.Int64
}

func (p *auditPropagator) Inject(_ context.Context, h pubsub.Header) {
	p.injects.Add(1)
	if h == nil {
		p.nilHeaders.Add(1)
	}
}

func (p *auditPropagator) Extract(ctx context.Context, _ pubsub.Header) context.Context { return ctx }

// auditInbox keeps whole messages.
type auditInbox struct {
	mu   sync.Mutex
	msgs []pubsub.Message
}

func (in *auditInbox) handler(_ context.Context, m *pubsub.Message) error {
	in.mu.Lock()
	in.msgs = append(in.msgs, *m)
	in.mu.Unlock()
	return nil
}

func (in *auditInbox) take() []pubsub.Message {
	in.mu.Lock()
	defer in.mu.Unlock()
	got := in.msgs
	in.msgs = nil
	return got
}

// isContractError says whether err wraps a package sentinel or a context
// error, as the package promises for every error it returns.
func isContractError(err error) bool {
	for _, s := range []error{pubsub.ErrQueueFull, pubsub.ErrTimeout, pubsub.ErrClosed, pubsub.ErrTooLarge,
		pubsub.ErrInvalidTopic, pubsub.ErrTopicUnavailable, pubsub.ErrEvicted, pubsub.ErrInvalidConfig,
		pubsub.ErrInvalidMessage, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// TestContractSecondWaveDetails runs the "Details the tests rely on" of the
// second wave on one 3-node cluster (publisher n0, owner n1, subscribers on
// n1 and n2), every node with a propagator that injects nothing and hooks.
func TestContractSecondWaveDetails(t *testing.T) {
	prop := &auditPropagator{}
	c, recs := hookedCluster(t, pubsub.WithPropagator(prop), pubsub.WithSubscriberTimeout(time.Second), pubsub.WithEvictAfter(100))
	pub, owner, far := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	ctx := ctxT(t)

	t.Run("no header arrives as nil, no key as empty, at every level and on every path", func(t *testing.T) {
		topic := ownedBy(t, owner, "audit-plain")
		var local, remote auditInbox
		subscribe(t, owner, topic, local.handler)
		subscribe(t, far, topic, remote.handler)
		typed, err := pubsub.NewTopic(pub, topic, pubsub.JSONCodec[int]())
		require.NoError(t, err)
		injectsBefore := prop.injects.Load()
		sent := 0
		for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
			_, err := pub.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("a")}, {Data: []byte("b"), Key: ""}}, pubsub.WithAck(level))
			require.NoError(t, err, level)
			_, err = typed.Publish(ctx, 1, pubsub.WithAck(level))
			require.NoError(t, err, level)
			// The owner publishing to itself, without NATS.
			_, err = owner.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("c")}}, pubsub.WithAck(level))
			require.NoError(t, err, level)
			sent += 4
		}
		_, err = pub.Publish(ctx, topic, []byte("d"))
		require.NoError(t, err)
		sent++
		for name, in := range map[string]*auditInbox{"on the owner": &local, "on another node": &remote} {
			var got []pubsub.Message
			testcluster.WaitFor(t, 5*time.Second, func() bool {
				got = append(got, in.take()...)
				return len(got) >= sent
			}, "%s: %d of %d messages", name, len(got), sent)
			for _, m := range got {
				assert.Nil(t, m.Header, "%s: %q arrived with header %#v", name, m.Data, m.Header)
				assert.Empty(t, m.Key, "%s: %q", name, m.Data)
			}
		}
		assert.Equal(t, int64(sent), prop.injects.Load()-injectsBefore, "Inject runs once per outgoing message")
		assert.Zero(t, prop.nilHeaders.Load(), "Inject always gets a non-nil Header")
	})

	t.Run("AckAccepted and AckNone acks have no deliveries nor failures, and say their level", func(t *testing.T) {
		topic := ownedBy(t, owner, "audit-levels")
		subscribe(t, far, topic, func(context.Context, *pubsub.Message) error { return errors.New("refuses") })
		subscribe(t, owner, topic, noop)
		ack, err := pub.Publish(ctx, topic, []byte("x"))
		require.NoError(t, err)
		assert.Equal(t, pubsub.AckDelivered, ack.Level)
		assert.Equal(t, 1, ack.Delivered)
		require.Len(t, ack.Failures, 1)
		assert.Equal(t, pubsub.HandlerError, ack.Failures[0].Status)

		typed, err := pubsub.NewTopic(pub, topic, pubsub.JSONCodec[string]())
		require.NoError(t, err)
		for _, level := range []pubsub.AckLevel{pubsub.AckAccepted, pubsub.AckNone} {
			for _, p := range []pubsub.Publisher{pub, owner} {
				ack, err := p.(*pubsub.Node).PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(level))
				require.NoError(t, err)
				assert.Equal(t, pubsub.PublishAck{Topic: topic, Status: pubsub.Accepted, Messages: 1, Level: level}, ack,
					"%s from %s", level, p.(*pubsub.Node).ID())
			}
			ack, err := typed.Publish(ctx, "x", pubsub.WithAck(level))
			require.NoError(t, err)
			assert.Equal(t, pubsub.PublishAck{Topic: topic, Status: pubsub.Accepted, Messages: 1, Level: level}, ack, "typed, %s", level)
		}
		for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted, pubsub.AckNone} {
			p, err := pubsub.NewBatchingProducer(pub, topic, pubsub.ProducerConfig{AckLevel: level})
			require.NoError(t, err)
			fs := []*pubsub.Produced{p.Produce(ctx, []byte("p1")), p.ProduceMessage(ctx, pubsub.Outgoing{Data: []byte("p2"), Key: "k"})}
			require.NoError(t, p.Flush(ctx))
			for i, f := range fs {
				ack, err := f.Wait(ctx)
				require.NoError(t, err)
				assert.Equal(t, level, ack.Level, "producer future %d", i)
				if level != pubsub.AckDelivered {
					assert.Zero(t, ack.Delivered, "producer future %d at %s", i, level)
					assert.Empty(t, ack.Failures, "producer future %d at %s", i, level)
				}
			}
			require.NoError(t, p.Close(ctx))
			tp, err := pubsub.NewTypedProducer(typed, pubsub.ProducerConfig{AckLevel: level})
			require.NoError(t, err)
			ack, err := tp.Produce(ctx, "typed").Wait(ctx)
			require.NoError(t, err)
			assert.Equal(t, level, ack.Level, "typed producer")
			require.NoError(t, tp.Close(ctx))
		}
	})

	t.Run("OnPublish once per call on the publisher, OnHandled once per subscriber per batch on its node", func(t *testing.T) {
		topic := ownedBy(t, owner, "audit-hooks")
		a := subscribe(t, far, topic, noop)
		b := subscribe(t, far, topic, noop)
		g1, err := owner.Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
		require.NoError(t, err)
		g2, err := far.Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
		require.NoError(t, err)
		typed, err := pubsub.NewTopic(pub, topic, pubsub.JSONCodec[int]())
		require.NoError(t, err)
		before := func(r *hookRecorder) (int, int) { return len(r.publishes()), len(r.handles()) }
		p0, _ := before(recs[0])
		p1, h1 := before(recs[1])
		_, h2 := before(recs[2])
		calls := []func() error{
			func() error { _, err := pub.Publish(ctx, topic, []byte("1")); return err },
			func() error { _, err := pub.PublishBatch(ctx, topic, [][]byte{[]byte("2"), []byte("3")}); return err },
			func() error {
				_, err := pub.PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("4"), Key: "k1"}, {Data: []byte("5"), Key: "k2"}})
				return err
			},
			func() error { _, err := typed.Publish(ctx, 6); return err },
		}
		for _, call := range calls {
			require.NoError(t, call())
		}
		_, err = pub.Publish(ctx, "bad topic", []byte("x"))
		require.ErrorIs(t, err, pubsub.ErrInvalidTopic)
		pubs := recs[0].publishes()[p0:]
		assert.Len(t, pubs, len(calls)+1, "one OnPublish per Publish* call, rejected ones included")
		assert.Len(t, recs[1].publishes(), p1, "the owner's hooks see no publish of another node")

		// Broadcast a and b run every batch; the group's members between
		// them run one share of each.
		perSub := map[pubsub.SubscriberID]int{}
		testcluster.WaitFor(t, 5*time.Second, func() bool {
			clear(perSub)
			for _, h := range recs[1].handles()[h1:] {
				require.Equal(t, owner.ID(), h.Subscriber.Node, "OnHandled on the subscriber's node")
				perSub[h.Subscriber]++
			}
			for _, h := range recs[2].handles()[h2:] {
				require.Equal(t, far.ID(), h.Subscriber.Node, "OnHandled on the subscriber's node")
				perSub[h.Subscriber]++
			}
			return perSub[a.ID()] >= len(calls) && perSub[b.ID()] >= len(calls) && perSub[g1.ID()]+perSub[g2.ID()] >= len(calls)
		}, "handled: %v", perSub)
		assert.Equal(t, len(calls), perSub[a.ID()])
		assert.Equal(t, len(calls), perSub[b.ID()])
		assert.LessOrEqual(t, perSub[g1.ID()], len(calls))
		assert.LessOrEqual(t, perSub[g2.ID()], len(calls))
		assert.Empty(t, recs[0].handles(), "no subscriber on the publisher's node")
	})

	t.Run("Topics lists each topic with a subscriber once, the same on every node", func(t *testing.T) {
		var lists [][]pubsub.TopicInfo
		for _, n := range c.Nodes {
			got, err := n.Topics(ctx)
			require.NoError(t, err)
			lists = append(lists, got)
			seen := map[string]bool{}
			for _, ti := range got {
				assert.False(t, seen[ti.Topic], "%s listed twice by %s", ti.Topic, n.ID())
				seen[ti.Topic] = true
				assert.Positive(t, ti.Subscribers, ti.Topic)
			}
			for _, want := range []string{"audit-plain", "audit-levels", "audit-hooks"} {
				found := false
				for topic := range seen {
					found = found || len(topic) > len(want) && topic[:len(want)] == want
				}
				assert.True(t, found, "%s not listed by %s", want, n.ID())
			}
		}
		assert.Equal(t, lists[0], lists[1])
		assert.Equal(t, lists[0], lists[2])
	})

	t.Run("a typed handler never runs for bytes its codec rejects", func(t *testing.T) {
		for name, sub := range map[string]*pubsub.Node{"on the owner": owner, "on another node": far} {
			topic := ownedBy(t, owner, "audit-decode-"+sub.ID())
			typed, err := pubsub.NewTopic(sub, topic, pubsub.JSONCodec[int]())
			require.NoError(t, err)
			var calls atomic.Int64
			s, err := typed.Subscribe(ctx, func(context.Context, int, *pubsub.Message) error { calls.Add(1); return nil })
			require.NoError(t, err)
			ack, err := pub.Publish(ctx, topic, []byte("not json"))
			require.NoError(t, err, name)
			assert.Zero(t, ack.Delivered, name)
			assert.Equal(t, []pubsub.DeliveryFailure{{Subscriber: s.ID(), Status: pubsub.DecodeError}}, ack.Failures, name)
			ack, err = pub.Publish(ctx, topic, []byte("7"))
			mustAccept(t, ack, err, 1)
			assert.Equal(t, int64(1), calls.Load(), name)
		}
	})

	t.Run("the last member's Unsubscribe ends the group silently", func(t *testing.T) {
		topic := ownedBy(t, owner, "audit-group-end")
		m1, err := far.Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
		require.NoError(t, err)
		m2, err := owner.Subscribe(ctx, topic, noop, pubsub.WithGroup("g"))
		require.NoError(t, err)
		ack, err := pub.Publish(ctx, topic, []byte("x"))
		mustAccept(t, ack, err, 1)
		require.NoError(t, m1.Unsubscribe(ctx))
		require.NoError(t, m2.Unsubscribe(ctx))
		assert.NoError(t, m2.Err(), "Err is nil after Unsubscribe")
		for _, p := range []*pubsub.Node{pub, owner} {
			ack, err = p.Publish(ctx, topic, []byte("y"))
			mustAccept(t, ack, err, 0)
		}
	})
}

// TestContractErrors checks the error contract on the rejections a caller
// can provoke: a Publish* error comes exactly with a Rejected ack of the
// documented Reason, errors.Is(err, ack.Reason.Err()) holds, and every
// other call's error wraps a sentinel.
func TestContractErrors(t *testing.T) {
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	ctx := ctxT(t)
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	big := make([]byte, n.MaxMessageSize()+1)
	typed, err := pubsub.NewTopic(n, "typed", pubsub.JSONCodec[func()]())
	require.NoError(t, err)

	type call func() (pubsub.PublishAck, error)
	rejections := []struct {
		name string
		call call
		want pubsub.Reason
	}{
		{"invalid topic", func() (pubsub.PublishAck, error) { return n.Publish(ctx, "a b", []byte("x")) }, pubsub.ReasonInvalidTopic},
		{"empty topic, batch", func() (pubsub.PublishAck, error) { return n.PublishBatch(ctx, "", [][]byte{[]byte("x")}) }, pubsub.ReasonInvalidTopic},
		{"too large", func() (pubsub.PublishAck, error) { return n.PublishBatch(ctx, "t", [][]byte{[]byte("x"), big}) }, pubsub.ReasonTooLarge},
		{"too large, AckNone", func() (pubsub.PublishAck, error) {
			return n.PublishMessages(ctx, "t", []pubsub.Outgoing{{Data: big}}, pubsub.WithAck(pubsub.AckNone))
		}, pubsub.ReasonTooLarge},
		{"cancelled", func() (pubsub.PublishAck, error) { return n.Publish(cancelled, "t", []byte("x")) }, pubsub.ReasonCancelled},
		{"cancelled, AckAccepted", func() (pubsub.PublishAck, error) {
			return n.PublishMessages(cancelled, "t", []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckAccepted))
		}, pubsub.ReasonCancelled},
		{"invalid header name", func() (pubsub.PublishAck, error) {
			return n.PublishMessages(ctx, "t", []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"a b": {"v"}}}})
		}, pubsub.ReasonInvalidMessage},
		{"empty header name, AckNone", func() (pubsub.PublishAck, error) {
			return n.PublishMessages(ctx, "t", []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"": {"v"}}}}, pubsub.WithAck(pubsub.AckNone))
		}, pubsub.ReasonInvalidMessage},
		{"header name with a colon", func() (pubsub.PublishAck, error) {
			return n.PublishMessages(ctx, "t", []pubsub.Outgoing{{Data: []byte("x"), Header: pubsub.Header{"a:b": {"v"}}}})
		}, pubsub.ReasonInvalidMessage},
		{"codec cannot encode", func() (pubsub.PublishAck, error) { return typed.Publish(ctx, func() {}) }, pubsub.ReasonInvalidMessage},
	}
	check := func(t *testing.T, ack pubsub.PublishAck, err error, want pubsub.Reason) {
		t.Helper()
		require.Error(t, err)
		assert.Equal(t, pubsub.Rejected, ack.Status, "ack %+v", ack)
		assert.Equal(t, want, ack.Reason, "ack %+v, err %v", ack, err)
		assert.ErrorIs(t, err, ack.Reason.Err())
		assert.Zero(t, ack.Delivered)
		assert.Empty(t, ack.Failures)
	}
	for _, tt := range rejections {
		t.Run(tt.name, func(t *testing.T) {
			ack, err := tt.call()
			check(t, ack, err, tt.want)
		})
	}

	// A producer's futures carry its AckLevel in Level, rejected ones too
	// (as a rejected batch's do).
	t.Run("producer", func(t *testing.T) {
		level := pubsub.AckAccepted
		p, err := pubsub.NewBatchingProducer(n, "t", pubsub.ProducerConfig{MaxQueueSize: 1, Linger: time.Hour, BatchSize: 1000, AckLevel: level})
		require.NoError(t, err)
		f := p.Produce(ctx, big)
		ack, err, done := f.Result()
		require.True(t, done, "a too-large message is rejected at Produce")
		check(t, ack, err, pubsub.ReasonTooLarge)
		assert.Equal(t, level, ack.Level, "too large")
		ack, err = p.ProduceMessage(ctx, pubsub.Outgoing{Header: pubsub.Header{"bad name": nil}}).Wait(ctx)
		check(t, ack, err, pubsub.ReasonInvalidMessage)
		assert.Equal(t, level, ack.Level, "invalid header")
		ack, err = p.Produce(cancelled, []byte("x")).Wait(ctx)
		check(t, ack, err, pubsub.ReasonCancelled)
		assert.Equal(t, level, ack.Level, "cancelled")
		// Linger keeps the first message queued: the second finds the
		// queue full, already done when Produce returns.
		queued := p.Produce(ctx, []byte("1"))
		var full *pubsub.Produced
		for range 100 { // the queue is empty again once a batch is cut
			full = p.Produce(ctx, []byte("2"))
			// Done without an error, it was queued, cut and accepted
			// already (a local owner answers AckAccepted in microseconds):
			// not the rejection looked for.
			if _, err, done := full.Result(); done && err != nil {
				break
			}
		}
		ack, err, done = full.Result()
		require.True(t, done, "a queue-full rejection is done when Produce returns")
		check(t, ack, err, pubsub.ReasonQueueFull)
		assert.Equal(t, level, ack.Level, "queue full")
		require.NoError(t, p.Close(ctx))
		ack, err = queued.Wait(ctx)
		require.NoError(t, err)
		assert.Equal(t, level, ack.Level, "published")
		ack, err = p.Produce(ctx, []byte("late")).Wait(ctx)
		check(t, ack, err, pubsub.ReasonClosed)
		assert.Equal(t, level, ack.Level, "closed")
		assert.True(t, isContractError(p.Flush(ctx)) || p.Flush(ctx) == nil)
	})

	t.Run("other calls", func(t *testing.T) {
		for _, tt := range []struct {
			name string
			err  func() error
			want error
		}{
			{"Join, invalid config", func() error {
				_, err := pubsub.Join(ctx, c.Connect(t, 0), pubsub.WithEvictAfter(-1))
				return err
			}, pubsub.ErrInvalidConfig},
			{"Subscribe, invalid topic", func() error { _, err := n.Subscribe(ctx, "", noop); return err }, pubsub.ErrInvalidTopic},
			{"Subscribe, invalid group", func() error { _, err := n.Subscribe(ctx, "t", noop, pubsub.WithGroup("a b")); return err }, pubsub.ErrInvalidConfig},
			{"Subscribe, nil handler", func() error { _, err := n.Subscribe(ctx, "t", nil); return err }, pubsub.ErrInvalidConfig},
			{"typed Subscribe, nil handler", func() error { _, err := typed.Subscribe(ctx, nil); return err }, pubsub.ErrInvalidConfig},
			{"OwnerOf, invalid topic", func() error { _, err := n.OwnerOf(""); return err }, pubsub.ErrInvalidTopic},
			{"Initialize, invalid topic", func() error { return n.Initialize(ctx, "") }, pubsub.ErrInvalidTopic},
			{"NewTopic, invalid topic", func() error { _, err := pubsub.NewTopic(n, "", pubsub.JSONCodec[int]()); return err }, pubsub.ErrInvalidTopic},
			{"NewBatchingProducer, invalid topic", func() error {
				_, err := pubsub.NewBatchingProducer(n, "", pubsub.ProducerConfig{})
				return err
			}, pubsub.ErrInvalidTopic},
			{"NewBatchingProducer, invalid config", func() error {
				_, err := pubsub.NewBatchingProducer(n, "t", pubsub.ProducerConfig{BatchSize: -1})
				return err
			}, pubsub.ErrInvalidConfig},
		} {
			t.Run(tt.name, func(t *testing.T) {
				err := tt.err()
				require.Error(t, err)
				assert.ErrorIs(t, err, tt.want)
				assert.True(t, isContractError(err), "%v wraps no package sentinel", err)
			})
		}
	})

	t.Run("options apply in order, a later one overriding an earlier one", func(t *testing.T) {
		j, err := pubsub.Join(ctx, c.Connect(t, 0), append(append([]pubsub.Option{}, fast...),
			pubsub.WithNodeID("bad id"), pubsub.WithEvictAfter(-1), pubsub.WithNodeID("later"), pubsub.WithEvictAfter(2))...)
		require.NoError(t, err)
		assert.Equal(t, "later", j.ID())
		require.NoError(t, j.Close(ctx))
	})

	t.Run("closed node", func(t *testing.T) {
		s := subscribe(t, n, "t", noop)
		require.NoError(t, n.Close(ctx))
		require.NoError(t, n.Close(ctx), "a second Close returns nil")
		<-s.Done()
		assert.ErrorIs(t, s.Err(), pubsub.ErrClosed)
		ack, err := n.Publish(ctx, "t", []byte("x"))
		check(t, ack, err, pubsub.ReasonClosed)
		ack, err = n.PublishMessages(ctx, "t", []pubsub.Outgoing{{Data: []byte("x")}}, pubsub.WithAck(pubsub.AckNone))
		check(t, ack, err, pubsub.ReasonClosed)
		sub, err := n.Subscribe(ctx, "t", noop)
		assert.Nil(t, sub)
		assert.ErrorIs(t, err, pubsub.ErrClosed)
		_, err = n.Topics(ctx)
		assert.True(t, isContractError(err), "Topics: %v", err)
	})
}
