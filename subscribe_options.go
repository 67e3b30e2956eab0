package pubsub

// SubscribeOption configures one subscription; pass it to Node.Subscribe.
type SubscribeOption func(*subscribeConfig)

// subscribeConfig holds one subscription's settings. A zero field means the
// node's default.
type subscribeConfig struct {
	// mailboxSize is set by WithSubscriptionMailbox.
	mailboxSize int
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
	return notNegative("WithSubscriptionMailbox", c.mailboxSize, node.MailboxSize, " batches, the node's MailboxSize")
}
