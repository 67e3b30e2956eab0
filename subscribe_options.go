package pubsub

import (
	"fmt"

	"github.com/clusterpubsub/pubsub/natsutil"
)

// SubscribeOption configures one subscription; pass it to Node.Subscribe.
type SubscribeOption func(*subscribeConfig)

// subscribeConfig holds one subscription's settings. A zero field means the
// node's default.
type subscribeConfig struct {
	// mailboxSize is set by WithSubscriptionMailbox.
	mailboxSize int
	// group is set by WithGroup; "" subscribes to every message.
	group string
}

// WithGroup makes the subscription a member of the consumer group name on
// its topic: each message reaches exactly one live member of the group
// (a message with a Key always the same member while the group is
// unchanged), while subscribers without a group get every message. The
// name follows the rules of topic names (an invalid one makes Subscribe
// fail with ErrInvalidConfig); "" (the default) means no group.
// The subscription's SubscriberID.Local ends with "@" and the name.
func WithGroup(name string) SubscribeOption {
	return func(c *subscribeConfig) { c.group = name }
}

// WithSubscriptionMailbox sets how many batches this subscription's mailbox
// holds before deliveries fail with MailboxFull. Default: the node's
// Config.MailboxSize (1024 batches unless WithMailboxSize changed it); 0 means
// that default, a negative value makes Subscribe fail with ErrInvalidConfig.
func WithSubscriptionMailbox(batches int) SubscribeOption {
	return func(c *subscribeConfig) { c.mailboxSize = batches }
}

// newSubscribeConfig applies opts (nil ones are skipped), then resolves the
// result against node, the subscribing node's resolved Config (see
// Config.resolve for the three steps).
func newSubscribeConfig(node *Config, opts []SubscribeOption) (subscribeConfig, error) {
	var c subscribeConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	err := c.resolve(node)
	return c, err
}

// resolve fills the defaults of c's zero fields from node, then validates it.
func (c *subscribeConfig) resolve(node *Config) error {
	orDefault(&c.mailboxSize, node.MailboxSize)
	if c.group != "" {
		if err := natsutil.ValidateTopic(c.group); err != nil {
			return fmt.Errorf("%w: WithGroup(%q): a group name follows the topic rules: %v", ErrInvalidConfig, c.group, err)
		}
	}
	return notNegative("WithSubscriptionMailbox", c.mailboxSize, node.MailboxSize, " batches, the node's MailboxSize")
}
