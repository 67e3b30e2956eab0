package pubsub

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// resolvePublisher is a Publisher that only reports limits: the resolvers
// look at a publisher's optional methods and never publish.
type resolvePublisher struct {
	Publisher  // nil: never called
	maxMessage int
	wait       time.Duration
}

func (p resolvePublisher) MaxMessageSize() int        { return p.maxMessage }
func (p resolvePublisher) publishWait() time.Duration { return p.wait }

// TestConfigResolve checks Config.resolve: every zero field takes the
// default its godoc states, explicit fields stay, and each invalid field is
// reported as ErrInvalidConfig with its name, its value and what to do.
func TestConfigResolve(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		var c Config
		require.NoError(t, c.resolve())
		assert.NotEmpty(t, c.NodeID)
		assert.Equal(t, "pubsub", c.Prefix)
		assert.Equal(t, 500*time.Millisecond, c.HeartbeatInterval)
		assert.Equal(t, 3*time.Second, c.MemberTimeout)
		assert.Equal(t, 5*time.Second, c.SubscriberTimeout)
		assert.Equal(t, 5*time.Second, c.RequestTimeout)
		assert.Equal(t, 3, c.EvictAfter)
		assert.Equal(t, 1024, c.MailboxSize)
		assert.Equal(t, 10*time.Second, c.MetricsInterval)
		assert.Equal(t, 1024, c.MaxMembers)
		assert.Equal(t, KeepServing, c.PartitionPolicy)
		require.NotNil(t, c.Logger)
		require.NotNil(t, c.DeliveryMode)
		assert.Equal(t, AtMostOnce, c.DeliveryMode("any"))
	})
	t.Run("explicit values stay", func(t *testing.T) {
		c := Config{NodeID: "n.1", Prefix: "app", HeartbeatInterval: time.Second, MemberTimeout: 2 * time.Second,
			EvictAfter: 9, MailboxSize: 7, MetricsInterval: -1, MaxMembers: 5, PartitionPolicy: KeepMajority}
		require.NoError(t, c.resolve())
		assert.Equal(t, "n.1", c.NodeID)
		assert.Equal(t, "app", c.Prefix)
		assert.Equal(t, time.Second, c.HeartbeatInterval)
		assert.Equal(t, 2*time.Second, c.MemberTimeout)
		assert.Equal(t, 9, c.EvictAfter)
		assert.Equal(t, 7, c.MailboxSize)
		assert.Equal(t, time.Duration(-1), c.MetricsInterval, "a negative MetricsInterval disables the events")
		assert.Equal(t, 5, c.MaxMembers)
		assert.Equal(t, KeepMajority, c.PartitionPolicy)
	})
	for _, tt := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"NodeID", Config{NodeID: "a b"}, `NodeID "a b" is invalid`},
		{"Prefix", Config{Prefix: "a..b"}, `Prefix "a..b" is invalid`},
		{"HeartbeatInterval", Config{HeartbeatInterval: -time.Second}, "HeartbeatInterval -1s is negative; use 0 for the default (500ms)"},
		{"MemberTimeout negative", Config{MemberTimeout: -time.Second}, "MemberTimeout -1s is negative; use 0 for the default (3s)"},
		{"MemberTimeout not above HeartbeatInterval", Config{HeartbeatInterval: time.Second, MemberTimeout: time.Second},
			"MemberTimeout 1s does not exceed HeartbeatInterval 1s; set it above HeartbeatInterval"},
		{"SubscriberTimeout", Config{SubscriberTimeout: -time.Second}, "SubscriberTimeout -1s is negative; use 0 for the default (5s)"},
		{"RequestTimeout", Config{RequestTimeout: -time.Second}, "RequestTimeout -1s is negative; use 0 for the default (5s)"},
		{"EvictAfter", Config{EvictAfter: -1}, "EvictAfter -1 is negative; use 0 for the default (3 failures)"},
		{"MailboxSize", Config{MailboxSize: -1}, "MailboxSize -1 is negative; use 0 for the default (1024 batches)"},
		{"MaxMembers", Config{MaxMembers: -1}, "MaxMembers -1 is negative; use 0 for the default (1024 nodes)"},
		{"PartitionPolicy", Config{PartitionPolicy: 7}, "PartitionPolicy PartitionPolicy(7) is unknown; use KeepServing (the default) or KeepMajority"},
	} {
		t.Run("invalid "+tt.name, func(t *testing.T) {
			err := tt.cfg.resolve()
			require.ErrorIs(t, err, ErrInvalidConfig)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestProducerConfigResolve checks ProducerConfig.resolve the same way, for
// a publisher without limits of its own and for one that reports them as a
// *Node does.
func TestProducerConfigResolve(t *testing.T) {
	zeroLimits := resolvePublisher{}  // reports 0 for both
	plainPub := struct{ Publisher }{} // has neither MaxMessageSize nor publishWait
	limited := resolvePublisher{maxMessage: 500_000, wait: 2 * time.Second}

	t.Run("defaults", func(t *testing.T) {
		var c ProducerConfig
		require.NoError(t, c.resolve(plainPub))
		assert.Equal(t, 2000, c.BatchSize)
		assert.Equal(t, 1<<20-64<<10, c.MaxBatchBytes)
		assert.Equal(t, time.Duration(0), c.Linger)
		assert.Equal(t, 100_000, c.MaxQueueSize)
		assert.Equal(t, 11*time.Second, c.PublishTimeout)
		assert.Equal(t, 4, c.MaxInFlight)
		require.NotNil(t, c.OnPublishError)
		assert.Equal(t, FailBatchAndStop, c.OnPublishError(1, errors.New("x")))
	})
	t.Run("defaults follow the publisher's limits", func(t *testing.T) {
		var c ProducerConfig
		require.NoError(t, c.resolve(limited))
		assert.Equal(t, 500_000, c.MaxBatchBytes, "MaxMessageSize")
		assert.Equal(t, 3*time.Second, c.PublishTimeout, "the publisher's wait + 1s")
	})
	t.Run("a publisher reporting no limit gets the constants", func(t *testing.T) {
		var c ProducerConfig
		require.NoError(t, c.resolve(zeroLimits))
		assert.Equal(t, DefaultMaxBatchBytes, c.MaxBatchBytes)
		assert.Equal(t, DefaultPublishTimeout, c.PublishTimeout)
	})
	t.Run("explicit values stay", func(t *testing.T) {
		c := ProducerConfig{BatchSize: 10, MaxBatchBytes: 4096, Linger: time.Millisecond, MaxQueueSize: 50,
			PublishTimeout: 10 * time.Second, MaxInFlight: 4, OnPublishError: func(int, error) ErrorDecision { return FailBatchAndContinue }}
		require.NoError(t, c.resolve(limited))
		assert.Equal(t, 10, c.BatchSize)
		assert.Equal(t, 4096, c.MaxBatchBytes)
		assert.Equal(t, time.Millisecond, c.Linger)
		assert.Equal(t, 50, c.MaxQueueSize)
		assert.Equal(t, 10*time.Second, c.PublishTimeout)
		assert.Equal(t, 4, c.MaxInFlight)
		assert.Equal(t, FailBatchAndContinue, c.OnPublishError(1, errors.New("x")))
	})
	for _, tt := range []struct {
		name string
		cfg  ProducerConfig
		want string
	}{
		{"BatchSize", ProducerConfig{BatchSize: -1}, "BatchSize -1 is negative; use 0 for the default (2000 messages)"},
		{"MaxBatchBytes", ProducerConfig{MaxBatchBytes: -1}, "MaxBatchBytes -1 is negative; use 0 for the default (500000 bytes)"},
		{"Linger", ProducerConfig{Linger: -time.Millisecond}, "Linger -1ms is negative; use 0 for the default (0s, no wait)"},
		{"MaxQueueSize", ProducerConfig{MaxQueueSize: -1}, "MaxQueueSize -1 is negative; use 0 for the default (100000 messages)"},
		{"PublishTimeout", ProducerConfig{PublishTimeout: -time.Second}, "PublishTimeout -1s is negative; use 0 for the default (3s for this publisher)"},
		{"MaxInFlight", ProducerConfig{MaxInFlight: -2}, "MaxInFlight -2 is negative; use 0 for the default (4 batches)"},
	} {
		t.Run("invalid "+tt.name, func(t *testing.T) {
			err := tt.cfg.resolve(limited)
			require.ErrorIs(t, err, ErrInvalidConfig)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestSubscribeConfigResolve checks the subscribe options: a subscription's
// mailbox defaults to its node's MailboxSize, and a negative one is
// reported with that default.
func TestSubscribeConfigResolve(t *testing.T) {
	node := &Config{MailboxSize: 7}
	for _, tt := range []struct {
		name string
		opts []SubscribeOption
		want int
	}{
		{"default: the node's MailboxSize", nil, 7},
		{"nil option skipped", []SubscribeOption{nil}, 7},
		{"zero means the default", []SubscribeOption{WithSubscriptionMailbox(0)}, 7},
		{"explicit", []SubscribeOption{WithSubscriptionMailbox(3)}, 3},
		{"the last option wins", []SubscribeOption{WithSubscriptionMailbox(3), WithSubscriptionMailbox(9)}, 9},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newSubscribeConfig(node, tt.opts)
			require.NoError(t, err)
			assert.Equal(t, tt.want, c.mailboxSize)
		})
	}
	t.Run("invalid WithSubscriptionMailbox", func(t *testing.T) {
		_, err := newSubscribeConfig(node, []SubscribeOption{WithSubscriptionMailbox(-1)})
		require.ErrorIs(t, err, ErrInvalidConfig)
		assert.Contains(t, err.Error(), "WithSubscriptionMailbox -1 is negative; use 0 for the default (7 batches, the node's MailboxSize)")
	})
}
