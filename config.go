package pubsub

import (
	"fmt"
	"log/slog"
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
	switch m {
	case AtMostOnce:
		return "at-most-once"
	case AtLeastOnce:
		return "at-least-once"
	}
	return fmt.Sprintf("DeliveryMode(%d)", uint8(m))
}

// Config holds a node's settings. A zero field means its default. Build it
// with Options passed to Join; they apply in order, a later one overriding an
// earlier one.
type Config struct {
	// NodeID names the node; unique among live nodes. Dot-separated tokens of
	// [A-Za-z0-9_-], at most 128 bytes. Default: random.
	NodeID string
	// Prefix of every subject the node uses. Default "pubsub".
	Prefix string
	// HeartbeatInterval between membership heartbeats. Default 500ms.
	HeartbeatInterval time.Duration
	// MemberTimeout after which a silent member is dropped. Default 3s; must
	// exceed HeartbeatInterval.
	MemberTimeout time.Duration
	// SubscriberTimeout a subscriber has to process one batch. Default 5s.
	SubscriberTimeout time.Duration
	// RequestTimeout of node-to-node requests (subscribe, sync, publish
	// routing). Default 5s.
	RequestTimeout time.Duration
	// EvictAfter consecutive failures of a subscriber evict it. Default 3.
	EvictAfter int
	// MailboxSize is the default number of batches a subscription's mailbox
	// holds before deliveries fail with MailboxFull. Default 1024.
	MailboxSize int
	// Logger receives the node's logs. Default: discard.
	Logger *slog.Logger
	// DeliveryMode returns the mode of a topic. Default: AtMostOnce for all.
	DeliveryMode func(topic string) DeliveryMode
	// MetricsInterval between MetricsSnapshot events. Default 10s; negative
	// disables them (WithMetricsInterval(0) does that too).
	MetricsInterval time.Duration
	// MaxMembers caps the view, this node included. Heartbeats of further
	// nodes are ignored, counted in Stats().MembersRejected, logged
	// (throttled) and reported by a MemberRejected event. It bounds what a
	// flood of forged heartbeats can cost. Default 1024.
	MaxMembers int
	// PartitionPolicy says what a node does when it cannot see a majority of
	// the cluster. Default KeepServing.
	PartitionPolicy PartitionPolicy
}

// Defaults of Config.
const (
	DefaultHeartbeatInterval = 500 * time.Millisecond
	DefaultMemberTimeout     = 3 * time.Second
	DefaultSubscriberTimeout = 5 * time.Second
	DefaultRequestTimeout    = 5 * time.Second
	DefaultEvictAfter        = 3
	DefaultMailboxSize       = 1024
	DefaultMetricsInterval   = 10 * time.Second
	DefaultMaxMembers        = 1024
)

// Option changes one Config field.
type Option func(*Config)

// WithNodeID sets the node ID (default random).
func WithNodeID(id string) Option { return func(c *Config) { c.NodeID = id } }

// WithPrefix sets the subject prefix (default "pubsub").
func WithPrefix(prefix string) Option { return func(c *Config) { c.Prefix = prefix } }

// WithHeartbeatInterval sets the heartbeat period (default 500ms).
func WithHeartbeatInterval(d time.Duration) Option {
	return func(c *Config) { c.HeartbeatInterval = d }
}

// WithMemberTimeout sets how long a silent member stays in the view (default 3s).
func WithMemberTimeout(d time.Duration) Option { return func(c *Config) { c.MemberTimeout = d } }

// WithSubscriberTimeout sets the time a subscriber has per batch (default 5s).
func WithSubscriberTimeout(d time.Duration) Option {
	return func(c *Config) { c.SubscriberTimeout = d }
}

// WithRequestTimeout sets the timeout of node-to-node requests (default 5s).
func WithRequestTimeout(d time.Duration) Option { return func(c *Config) { c.RequestTimeout = d } }

// WithEvictAfter sets the consecutive failures that evict a subscriber (default 3).
func WithEvictAfter(n int) Option { return func(c *Config) { c.EvictAfter = n } }

// WithMailboxSize sets the default mailbox capacity in batches (default 1024).
func WithMailboxSize(n int) Option { return func(c *Config) { c.MailboxSize = n } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *Config) { c.Logger = l } }

// WithDeliveryMode sets the per-topic delivery mode (default AtMostOnce).
func WithDeliveryMode(mode func(topic string) DeliveryMode) Option {
	return func(c *Config) { c.DeliveryMode = mode }
}

// WithMetricsInterval sets the period of MetricsSnapshot events (default
// 10s); 0 or negative disables them.
func WithMetricsInterval(d time.Duration) Option {
	return func(c *Config) {
		if d <= 0 {
			d = -1
		}
		c.MetricsInterval = d
	}
}

// WithMaxMembers caps the member view (default 1024); nodes beyond it are
// ignored, with a MemberRejected event.
func WithMaxMembers(n int) Option { return func(c *Config) { c.MaxMembers = n } }

// WithPartitionPolicy sets what a node cut off from the majority does
// (default KeepServing).
func WithPartitionPolicy(p PartitionPolicy) Option {
	return func(c *Config) { c.PartitionPolicy = p }
}

// resolve fills defaults and validates.
func (c *Config) resolve() error {
	if c.NodeID == "" {
		c.NodeID = randomID()
	}
	if c.Prefix == "" {
		c.Prefix = natsutil.DefaultPrefix
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.HeartbeatInterval, DefaultHeartbeatInterval)
	def(&c.MemberTimeout, DefaultMemberTimeout)
	def(&c.SubscriberTimeout, DefaultSubscriberTimeout)
	def(&c.RequestTimeout, DefaultRequestTimeout)
	def(&c.MetricsInterval, DefaultMetricsInterval)
	if c.EvictAfter == 0 {
		c.EvictAfter = DefaultEvictAfter
	}
	if c.MailboxSize == 0 {
		c.MailboxSize = DefaultMailboxSize
	}
	if c.MaxMembers == 0 {
		c.MaxMembers = DefaultMaxMembers
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.DeliveryMode == nil {
		c.DeliveryMode = func(string) DeliveryMode { return AtMostOnce }
	}
	if err := natsutil.ValidateNodeID(c.NodeID); err != nil {
		return fmt.Errorf("%w: node ID: %v", ErrInvalidConfig, err)
	}
	if err := natsutil.ValidatePrefix(c.Prefix); err != nil {
		return fmt.Errorf("%w: prefix: %v", ErrInvalidConfig, err)
	}
	switch {
	case c.HeartbeatInterval < 0, c.MemberTimeout < 0, c.SubscriberTimeout < 0, c.RequestTimeout < 0:
		return fmt.Errorf("%w: negative duration", ErrInvalidConfig)
	case c.MemberTimeout <= c.HeartbeatInterval:
		return fmt.Errorf("%w: MemberTimeout %v must exceed HeartbeatInterval %v", ErrInvalidConfig, c.MemberTimeout, c.HeartbeatInterval)
	case c.EvictAfter < 0:
		return fmt.Errorf("%w: EvictAfter %d is negative", ErrInvalidConfig, c.EvictAfter)
	case c.MailboxSize < 0:
		return fmt.Errorf("%w: MailboxSize %d is negative", ErrInvalidConfig, c.MailboxSize)
	case c.MaxMembers < 0:
		return fmt.Errorf("%w: MaxMembers %d is negative", ErrInvalidConfig, c.MaxMembers)
	case c.PartitionPolicy > KeepMajority:
		return fmt.Errorf("%w: unknown PartitionPolicy %d; use KeepServing or KeepMajority", ErrInvalidConfig, c.PartitionPolicy)
	}
	return nil
}
