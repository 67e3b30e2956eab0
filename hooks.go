package pubsub

import (
	"fmt"
	"time"
)

// Hook is a value implementing one or more of the hook interfaces
// (PublishHook, HandledHook): the seam metrics and tracing adapters plug
// into, in the style of franz-go's hooks. Give hooks to a node with
// WithHooks. A hook implementing none of the interfaces makes Join fail
// with ErrInvalidConfig.
//
// Hooks run synchronously on the data path, on the goroutine that did the
// work (the publishing caller, a producer, a subscription's mailbox; see
// HandledHook for the exceptions): they must be fast and must not block.
// A hook that panics is recovered and logged (throttled); the work it
// observed is not affected. Without hooks the data path costs one length
// check.
type Hook any

// PublishHook observes publishing: OnPublish runs on the publishing node
// once per Publish, PublishBatch, PublishMessages or Topic[T].Publish call
// (rejected ones included) and once per attempt of each batch a
// BatchingProducer publishes (one failing in Initialize included), when it
// returns, with its outcome.
type PublishHook interface {
	OnPublish(PublishInfo)
}

// HandledHook observes subscribers: OnHandled runs on the subscriber's node
// once per subscriber per batch (for a group member, per share of a batch)
// once the node reported the subscriber's outcome to the owner: after its
// handler ran, or when the batch could not reach it (MailboxFull,
// SubscriberGone, OutOfOrder, or a Timeout before it started). So the
// publisher's ack may return before the hooks of its subscribers ran, and
// a hook's own time never counts against the SubscriberTimeout of the
// batch it observes. It does count against the batches queued behind it in
// the mailbox, whose SubscriberTimeout runs from their arrival: a hook
// slower than SubscriberTimeout makes them Timeout and can evict a
// subscription whose handler is fast.
//
// It runs on the subscription's mailbox goroutine, except for MailboxFull
// and SubscriberGone decided on arrival, which run where the batch arrives
// (the node's inbox, or the local owner's topic actor): a slow hook there
// delays every delivery to the node.
type HandledHook interface {
	OnHandled(HandledInfo)
}

// PublishInfo is one publish, as a PublishHook sees it.
type PublishInfo struct {
	Topic    string
	Messages int // messages in the call or batch
	// Bytes counts the messages' data, keys and headers as MaxMessageSize
	// counts them (for a call rejected before its batch was built: data,
	// keys, header names and values).
	Bytes    int
	Ack      PublishAck    // the ack the call returned
	Err      error         // the error it returned, nil when accepted
	Duration time.Duration // from the call to its return
}

// HandledInfo is one batch at one subscriber, as a HandledHook sees it.
type HandledInfo struct {
	Topic      string
	Subscriber SubscriberID
	Group      string // the subscriber's consumer group, "" for broadcast
	Messages   int    // messages in the batch (a group member's share)
	// Status is the outcome the owner was told. A handler that ran past
	// SubscriberTimeout is reported Timeout once it returns, whatever it
	// returned.
	Status DeliveryStatus
	// Wait is the batch's time in the subscriber's mailbox; Duration the
	// handler's time on it (0 when it never ran).
	Wait, Duration time.Duration
	// Err is the error the handler returned, a recovered panic as a
	// *PanicError (HandlerError; with Timeout, what a handler that
	// ran past SubscriberTimeout returned, often its ctx's error), or the
	// codec's last error (DecodeError); nil when the handler returned
	// none or never ran. The node logs a HandlerError's too, at warn
	// level, when it has a Logger (throttled).
	Err error
}

// WithHooks adds hooks to Config.Hooks; several calls add up. Each hook
// must implement PublishHook, HandledHook or both. Default: no hooks, which
// costs the data path one length check.
func WithHooks(hooks ...Hook) Option {
	return func(c *Config) { c.Hooks = append(c.Hooks, hooks...) }
}

// hookSet is a node's hooks, sorted by interface at Join.
type hookSet struct {
	publish []PublishHook
	handled []HandledHook
}

// newHookSet sorts hooks, failing on one that implements no hook interface.
func newHookSet(hooks []Hook) (hookSet, error) {
	var s hookSet
	for i, h := range hooks {
		p, isPublish := h.(PublishHook)
		d, isHandled := h.(HandledHook)
		if !isPublish && !isHandled {
			return hookSet{}, invalidConfig(fmt.Sprintf("Hooks[%d]", i), fmt.Sprintf("(%T)", h), "implements no hook interface", "give values implementing PublishHook or HandledHook")
		}
		if isPublish {
			s.publish = append(s.publish, p)
		}
		if isHandled {
			s.handled = append(s.handled, d)
		}
	}
	return s, nil
}

// hookClock returns the time when hooks will look at it, and the zero time,
// with no clock read, when there are none.
func hookClock[H any](hooks []H) time.Time {
	if len(hooks) == 0 {
		return time.Time{}
	}
	return time.Now()
}

// sinceHookClock is the time since t, 0 when hookClock did not read it.
func sinceHookClock(t time.Time) time.Duration {
	if t.IsZero() {
		return 0
	}
	return time.Since(t)
}

// published runs the PublishHooks for a call that started at start.
func (n *Node) published(topic string, messages, bytes int, start time.Time, ack PublishAck, err error) {
	if len(n.hooks.publish) == 0 {
		return
	}
	info := PublishInfo{Topic: topic, Messages: messages, Bytes: bytes, Ack: ack, Err: err, Duration: time.Since(start)}
	for _, h := range n.hooks.publish {
		n.runHook("publish", func() { h.OnPublish(info) })
	}
}

// handled runs the HandledHooks for subscriber id's part of a batch.
func (n *Node) handled(topic string, id SubscriberID, messages int, status DeliveryStatus, wait, dur time.Duration) {
	n.handledErr(topic, id, messages, status, wait, dur, nil)
}

// handledErr is handled for a batch the handler ran, with its error.
func (n *Node) handledErr(topic string, id SubscriberID, messages int, status DeliveryStatus, wait, dur time.Duration, err error) {
	if len(n.hooks.handled) == 0 {
		return
	}
	info := HandledInfo{Topic: topic, Subscriber: id, Group: id.Group(), Messages: messages, Status: status, Wait: wait, Duration: dur, Err: err}
	for _, h := range n.hooks.handled {
		n.runHook("handled", func() { h.OnHandled(info) })
	}
}

// runHook runs one hook call, recovering a panic into a throttled log.
func (n *Node) runHook(kind string, call func()) {
	defer func() {
		if r := recover(); r != nil {
			if ok, held := n.log.limit.allow("hook/" + kind); ok {
				n.log.Error("hook panicked", "hook", kind, "panic", r, "suppressed", held)
			}
		}
	}()
	call()
}

// dataBytes is the bytes of a plain batch, for a hook.
func dataBytes(batch [][]byte) int {
	total := 0
	for _, d := range batch {
		total += len(d)
	}
	return total
}

// outgoingBytes is the bytes of msgs as MaxMessageSize counts them, for a
// hook: data, key, and each header name and value.
func outgoingBytes(msgs []Outgoing) int {
	total := 0
	for _, m := range msgs {
		total += len(m.Data) + len(m.Key)
		for name, values := range m.Header {
			for _, v := range values {
				total += len(name) + len(v)
			}
		}
	}
	return total
}
