package pubsub

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/clusterpubsub/pubsub/natsutil"
)

// DeliveryMode selects how hard a topic's owner tries to deliver a batch.
type DeliveryMode uint8

const (
	// AtMostOnce delivers each batch at most once; a node that does not
	// answer is reported as failed. The default.
	AtMostOnce DeliveryMode = iota
	// AtLeastOnce retries deliveries that failed transiently until the
	// subscriber timeout; receiving nodes drop duplicates.
	AtLeastOnce
)

// String implements fmt.Stringer.
func (m DeliveryMode) String() string {
	return enumName(m, "DeliveryMode", "at-most-once", "at-least-once")
}

// Config holds a node's settings. Build it with Options passed to Join; they
// apply in order, a later one overriding an earlier one. A zero field means
// its default; a negative number or duration makes Join fail with
// ErrInvalidConfig (except MetricsInterval, where it disables the events),
// as do an invalid NodeID or Prefix, a MemberTimeout not above
// HeartbeatInterval and an unknown PartitionPolicy.
type Config struct {
	// NodeID names the node; unique among live nodes: dot-separated tokens
	// of [A-Za-z0-9_-], at most 128 bytes. Default: a random ID.
	NodeID string
	// Prefix of every subject the node uses: dot-separated tokens of
	// [A-Za-z0-9_-]. Default: "pubsub".
	Prefix string
	// HeartbeatInterval is the period of membership heartbeats, a duration.
	// Default: 500ms (DefaultHeartbeatInterval).
	HeartbeatInterval time.Duration
	// MemberTimeout is how long a silent member stays in the view, a
	// duration; it must exceed HeartbeatInterval. Default: 3s
	// (DefaultMemberTimeout).
	MemberTimeout time.Duration
	// SubscriberTimeout is how long a subscriber has to process one batch, a
	// duration. Default: 5s (DefaultSubscriberTimeout).
	SubscriberTimeout time.Duration
	// RequestTimeout bounds node-to-node requests (subscribe, sync, publish
	// routing), a duration. Default: 5s (DefaultRequestTimeout).
	RequestTimeout time.Duration
	// EvictAfter is the number of consecutive failures that evict a
	// subscriber. Default: 3 (DefaultEvictAfter). MailboxFull failures
	// evict only once the run has also lasted SubscriberTimeout, so a burst
	// that overflows a healthy subscriber's mailbox does not.
	EvictAfter int
	// MailboxSize is the default number of batches a subscription's mailbox
	// holds before deliveries fail with MailboxFull (WithSubscriptionMailbox
	// overrides it per subscription). Default: 1024 batches
	// (DefaultMailboxSize).
	MailboxSize int
	// Logger receives the node's logs. Default: nil, which discards them.
	Logger *slog.Logger
	// DeliveryMode returns the mode of a topic. The topic's owner asks its
	// own, once per batch on the topic's actor, so nodes should agree on it;
	// it must be fast and safe for concurrent use. Default: nil, which
	// means AtMostOnce for every topic.
	DeliveryMode func(topic string) DeliveryMode
	// MetricsInterval is the period of MetricsSnapshot events, a duration;
	// negative disables them (WithMetricsInterval(0) does that too).
	// Default: 10s (DefaultMetricsInterval).
	MetricsInterval time.Duration
	// MaxMembers caps the view, this node included, in nodes. Heartbeats of
	// further nodes are ignored, counted in Stats().MembersRejected, logged
	// (throttled) and reported by a MemberRejected event. It bounds what a
	// flood of forged heartbeats can cost. Default: 1024 nodes
	// (DefaultMaxMembers).
	MaxMembers int
	// PartitionPolicy says what a node does when it cannot see a majority of
	// the cluster. Default: KeepServing (the zero value).
	PartitionPolicy PartitionPolicy
	// ClientOnly makes the node publish and subscribe without ever owning a
	// topic (edge services, tools): ownership runs over the other members.
	// Default: false.
	ClientOnly bool
	// Propagator injects context (a trace) into each published message's
	// header and extracts it into each handler's ctx. Default: nil, which
	// costs nothing.
	Propagator Propagator
	// Hooks observe publishes and handled batches on the data path (see
	// Hook). Default: none, which costs a length check.
	Hooks []Hook

	// silentWait, set by tests only: publish as a node of an older version
	// of this package did, without saying how long it waits for the
	// answer (answer_by.go), so a slow subscriber times its attempts out.
	silentWait bool
	// pushHook, set by tests only: called by pushMoved between the
	// snapshot of the subscriptions it pushes and their writes (written
	// false), and after the writes (true).
	pushHook func(written bool)
}

// Defaults of Config.
const (
	DefaultHeartbeatInterval = 500 * time.Millisecond
	DefaultMemberTimeout     = 3 * time.Second
	DefaultSubscriberTimeout = 5 * time.Second
	DefaultRequestTimeout    = 5 * time.Second
	DefaultEvictAfter        = 3    // consecutive failures
	DefaultMailboxSize       = 1024 // batches
	DefaultMetricsInterval   = 10 * time.Second
	DefaultMaxMembers        = 1024 // nodes, this one included
)

// Option changes one Config field.
type Option func(*Config)

// WithNodeID sets Config.NodeID, the node's name: dot-separated tokens of
// [A-Za-z0-9_-], at most 128 bytes. Default: a random ID.
func WithNodeID(id string) Option { return func(c *Config) { c.NodeID = id } }

// WithPrefix sets Config.Prefix, the prefix of every subject the node uses.
// Default: "pubsub".
func WithPrefix(prefix string) Option { return func(c *Config) { c.Prefix = prefix } }

// WithHeartbeatInterval sets Config.HeartbeatInterval, the period of
// membership heartbeats. Default: 500ms (DefaultHeartbeatInterval).
func WithHeartbeatInterval(d time.Duration) Option {
	return func(c *Config) { c.HeartbeatInterval = d }
}

// WithMemberTimeout sets Config.MemberTimeout, how long a silent member stays
// in the view; it must exceed the heartbeat interval. Default: 3s
// (DefaultMemberTimeout).
func WithMemberTimeout(d time.Duration) Option { return func(c *Config) { c.MemberTimeout = d } }

// WithSubscriberTimeout sets Config.SubscriberTimeout, the time a subscriber
// has per batch. Default: 5s (DefaultSubscriberTimeout).
func WithSubscriberTimeout(d time.Duration) Option {
	return func(c *Config) { c.SubscriberTimeout = d }
}

// WithRequestTimeout sets Config.RequestTimeout, the timeout of node-to-node
// requests. Default: 5s (DefaultRequestTimeout).
func WithRequestTimeout(d time.Duration) Option { return func(c *Config) { c.RequestTimeout = d } }

// WithEvictAfter sets Config.EvictAfter, the number of consecutive failures
// that evict a subscriber. Default: 3 (DefaultEvictAfter).
func WithEvictAfter(n int) Option { return func(c *Config) { c.EvictAfter = n } }

// WithMailboxSize sets Config.MailboxSize, the default mailbox capacity of a
// subscription in batches. Default: 1024 batches (DefaultMailboxSize).
func WithMailboxSize(n int) Option { return func(c *Config) { c.MailboxSize = n } }

// WithLogger sets Config.Logger, the node's logger. Default: nil, which
// discards the logs.
func WithLogger(l *slog.Logger) Option { return func(c *Config) { c.Logger = l } }

// WithDeliveryMode sets Config.DeliveryMode, the delivery mode of each topic,
// as the topic's owner decides it. Default: nil, which means AtMostOnce for
// every topic.
func WithDeliveryMode(mode func(topic string) DeliveryMode) Option {
	return func(c *Config) { c.DeliveryMode = mode }
}

// WithMetricsInterval sets Config.MetricsInterval, the period of
// MetricsSnapshot events; 0 or negative disables them. Default (without this
// option): 10s (DefaultMetricsInterval).
func WithMetricsInterval(d time.Duration) Option {
	return func(c *Config) {
		if d <= 0 {
			d = -1
		}
		c.MetricsInterval = d
	}
}

// WithMaxMembers sets Config.MaxMembers, the largest view in nodes, this one
// included; nodes beyond it are ignored, with a MemberRejected event.
// Default: 1024 nodes (DefaultMaxMembers).
func WithMaxMembers(n int) Option { return func(c *Config) { c.MaxMembers = n } }

// WithClientOnly makes the node client-only (Config.ClientOnly): it
// publishes and subscribes but never owns a topic. A cluster whose members
// are all client-only has no owner: publishes and subscribes wait up to
// RequestTimeout for a member that may own topics, then fail with
// ErrTopicUnavailable. Default (without this option): the node may own
// topics.
func WithClientOnly() Option { return func(c *Config) { c.ClientOnly = true } }

// WithPartitionPolicy sets Config.PartitionPolicy, what a node cut off from
// the majority does. Default: KeepServing.
func WithPartitionPolicy(p PartitionPolicy) Option {
	return func(c *Config) { c.PartitionPolicy = p }
}

// Every configuration is resolved in the same three steps: apply the options
// (or copy the struct), fill the defaults of zero fields, validate, reporting
// each invalid field as invalidConfig words it. Config: Join applies the
// Options, then Config.resolve. ProducerConfig: NewBatchingProducer copies it,
// then ProducerConfig.resolve. Subscriptions: newSubscribeConfig applies the
// SubscribeOptions, then subscribeConfig.resolve.

// resolve fills the defaults of c's zero fields, then validates it.
func (c *Config) resolve() error {
	if c.NodeID == "" {
		c.NodeID = randomID()
	}
	orDefault(&c.Prefix, natsutil.DefaultPrefix)
	orDefault(&c.HeartbeatInterval, DefaultHeartbeatInterval)
	orDefault(&c.MemberTimeout, DefaultMemberTimeout)
	orDefault(&c.SubscriberTimeout, DefaultSubscriberTimeout)
	orDefault(&c.RequestTimeout, DefaultRequestTimeout)
	orDefault(&c.EvictAfter, DefaultEvictAfter)
	orDefault(&c.MailboxSize, DefaultMailboxSize)
	orDefault(&c.MetricsInterval, DefaultMetricsInterval)
	orDefault(&c.MaxMembers, DefaultMaxMembers)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.DeliveryMode == nil {
		c.DeliveryMode = func(string) DeliveryMode { return AtMostOnce }
	}
	return errors.Join(
		validSubjectTokens("NodeID", c.NodeID, natsutil.ValidateNodeID, "leave it empty for a random ID"),
		validSubjectTokens("Prefix", c.Prefix, natsutil.ValidatePrefix, `leave it empty for "pubsub"`),
		notNegative("HeartbeatInterval", c.HeartbeatInterval, DefaultHeartbeatInterval, ""),
		notNegative("MemberTimeout", c.MemberTimeout, DefaultMemberTimeout, ""),
		exceeds("MemberTimeout", c.MemberTimeout, "HeartbeatInterval", c.HeartbeatInterval),
		notNegative("SubscriberTimeout", c.SubscriberTimeout, DefaultSubscriberTimeout, ""),
		notNegative("RequestTimeout", c.RequestTimeout, DefaultRequestTimeout, ""),
		notNegative("EvictAfter", c.EvictAfter, DefaultEvictAfter, " failures"),
		notNegative("MailboxSize", c.MailboxSize, DefaultMailboxSize, " batches"),
		notNegative("MaxMembers", c.MaxMembers, DefaultMaxMembers, " nodes"),
		knownPartitionPolicy(c.PartitionPolicy),
	)
}

// invalidConfig is how every resolver words an invalid field: "<Field>
// <value> <problem>; <what to do>", wrapping ErrInvalidConfig.
func invalidConfig(field string, value any, problem, todo string) error {
	return fmt.Errorf("%w: %s %v %s; %s", ErrInvalidConfig, field, value, problem, todo)
}

// orDefault sets *v to def when it is zero.
func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// notNegative reports a negative v of field; def (followed by unit) is the
// default a zero gives.
func notNegative[T ~int | ~int64](field string, v, def T, unit string) error {
	if v >= 0 {
		return nil
	}
	return invalidConfig(field, v, "is negative", fmt.Sprintf("use 0 for the default (%v%s) or a positive value", def, unit))
}

// exceeds reports a non-negative v of field that is not above other's value
// ov (a negative v is notNegative's to report).
func exceeds(field string, v time.Duration, other string, ov time.Duration) error {
	if v < 0 || v > ov {
		return nil
	}
	return invalidConfig(field, v, "does not exceed "+other+" "+ov.String(), "set it above "+other+" (by a few heartbeats; the defaults are 3s and 500ms)")
}

// validSubjectTokens reports a value of field that validate rejects; its
// error names the allowed characters and length.
func validSubjectTokens(field, v string, validate func(string) error, orElse string) error {
	if err := validate(v); err != nil {
		return invalidConfig(field, strconv.Quote(v), "is invalid ("+err.Error()+")", "correct it, or "+orElse)
	}
	return nil
}

// knownPartitionPolicy reports a PartitionPolicy this version does not know.
func knownPartitionPolicy(p PartitionPolicy) error {
	if p <= KeepMajority {
		return nil
	}
	return invalidConfig("PartitionPolicy", p, "is unknown", "use KeepServing (the default) or KeepMajority")
}
