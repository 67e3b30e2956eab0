package pubsub

import (
	"context"
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package wraps one of them (or
// a context error), so callers branch with errors.Is.
var (
	// ErrQueueFull: a BatchingProducer's queue holds MaxQueueSize messages;
	// or the topic's owner had no room for a request (a publish, subscribe,
	// unsubscribe, Initialize or TopicStats), so nothing was published: its
	// queue for the topic was full (at once when the owner is this node),
	// or the owner refused every retry within RequestTimeout, or until the
	// caller's ctx ended, because that queue (another node's) or the
	// deliveries it accepted and has not settled held their bound. Or an
	// AckNone publish found its topic's outbox on this node full until its
	// ctx ended.
	ErrQueueFull = errors.New("pubsub: queue full")
	// ErrTimeout: no answer in time; the outcome of the publish is unknown.
	ErrTimeout = errors.New("pubsub: timeout")
	// ErrClosed: the node, subscription or producer is closed.
	ErrClosed = errors.New("pubsub: closed")
	// ErrTooLarge: a single message does not fit in one NATS message
	// (Node.MaxMessageSize) or in a producer's MaxBatchBytes, or, from
	// Node.Topics, a member's listing passed its bound.
	ErrTooLarge = errors.New("pubsub: message too large")
	// ErrInvalidTopic: the topic is empty, too long, not UTF-8, or holds
	// whitespace or control characters.
	ErrInvalidTopic = errors.New("pubsub: invalid topic")
	// ErrTopicUnavailable: no owner served the topic within the request
	// timeout, or before the caller's context ended (the error then also
	// wraps the context's error): the membership is changing or the owner
	// is unreachable, and a publish failing so published nothing.
	ErrTopicUnavailable = errors.New("pubsub: topic unavailable")
	// ErrEvicted: the topic's owner removed the subscription; the wrapping
	// error says why.
	ErrEvicted = errors.New("pubsub: subscriber evicted")
	// ErrInvalidConfig: an option or config field is out of range, an
	// argument is nil or invalid (a handler, a codec, a WaitMembers count),
	// or Join found the node ID in use or the NATS user without a
	// permission the node needs.
	ErrInvalidConfig = errors.New("pubsub: invalid config")
	// ErrInvalidMessage: a message cannot be published as given (an invalid
	// header name, or a value a Topic's codec could not encode).
	ErrInvalidMessage = errors.New("pubsub: invalid message")
	// ErrTooManySubscriptions: Subscribe on a node that holds 1 048 576
	// subscriptions already. Unsubscribe what is not used, or subscribe
	// from more nodes.
	ErrTooManySubscriptions = errors.New("pubsub: too many subscriptions")
	// ErrCancelled is context.Canceled itself, so errors.Is works with either.
	ErrCancelled = context.Canceled
)

// AckStatus says whether the owner accepted a publish.
type AckStatus uint8

const (
	// Accepted: the owner took the batch and attempted delivery to every
	// subscriber it knew at acceptance. For an AckNone publish it says
	// only that the publisher saw no reason to reject it (see AckNone).
	Accepted AckStatus = iota
	// Rejected: the publish failed; PublishAck.Reason says why. With
	// ReasonTimeout, and ReasonCancelled for a Publish* call cancelled
	// while it waited for its owner's answer, the outcome is unknown (the
	// batch may have been delivered); with every other reason nothing was
	// published.
	Rejected
)

// String implements fmt.Stringer.
func (s AckStatus) String() string { return enumName(s, "AckStatus", "accepted", "rejected") }

// enumName names v by its place in names, or as type(v) when out of range.
func enumName[T ~uint8](v T, typ string, names ...string) string {
	if int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("%s(%d)", typ, uint8(v))
}

// Reason says why a publish was rejected.
type Reason uint8

const (
	ReasonNone             Reason = iota // accepted
	ReasonQueueFull                      // a producer's queue is full, or the topic's owner was overloaded (ErrQueueFull); nothing published
	ReasonTimeout                        // no answer in time; outcome unknown
	ReasonClosed                         // node or producer closed
	ReasonTooLarge                       // a message exceeds Node.MaxMessageSize (the NATS payload limit less the envelope)
	ReasonInvalidTopic                   // topic failed validation
	ReasonCancelled                      // the caller's context was cancelled (a Publish* call cancelled while waiting for its answer: outcome unknown)
	ReasonTopicUnavailable               // no ready owner within the request timeout or the caller's deadline; nothing published
	ReasonInvalidMessage                 // an invalid header name, or a value the codec could not encode
	ReasonInvalidConfig                  // an option of the call is invalid (WithAck with a value that is no AckLevel)
)

// String implements fmt.Stringer.
func (r Reason) String() string {
	return enumName(r, "Reason", "none", "queue-full", "timeout", "closed", "too-large", "invalid-topic", "cancelled", "topic-unavailable", "invalid-message", "invalid-config")
}

// Err returns the sentinel error of r, or nil for ReasonNone.
func (r Reason) Err() error {
	switch r {
	case ReasonNone:
		return nil
	case ReasonQueueFull:
		return ErrQueueFull
	case ReasonTimeout:
		return ErrTimeout
	case ReasonClosed:
		return ErrClosed
	case ReasonTooLarge:
		return ErrTooLarge
	case ReasonInvalidTopic:
		return ErrInvalidTopic
	case ReasonCancelled:
		return ErrCancelled
	case ReasonTopicUnavailable:
		return ErrTopicUnavailable
	case ReasonInvalidMessage:
		return ErrInvalidMessage
	case ReasonInvalidConfig:
		return ErrInvalidConfig
	}
	return fmt.Errorf("pubsub: unknown reason %d", uint8(r))
}

// reasonOf maps an error to the Reason a Rejected ack reports for it.
func reasonOf(err error) Reason {
	switch {
	case err == nil:
		return ReasonNone
	case errors.Is(err, ErrQueueFull):
		return ReasonQueueFull
	case errors.Is(err, ErrClosed):
		return ReasonClosed
	case errors.Is(err, ErrTooLarge):
		return ReasonTooLarge
	case errors.Is(err, ErrInvalidTopic):
		return ReasonInvalidTopic
	case errors.Is(err, context.Canceled):
		return ReasonCancelled
	case errors.Is(err, ErrTopicUnavailable):
		return ReasonTopicUnavailable
	case errors.Is(err, ErrInvalidMessage):
		return ReasonInvalidMessage
	case errors.Is(err, ErrInvalidConfig):
		return ReasonInvalidConfig
	}
	return ReasonTimeout // deadline exceeded, transport errors: outcome unknown
}

// DeliveryStatus is the outcome of one batch for one subscriber.
type DeliveryStatus uint8

const (
	Delivered      DeliveryStatus = iota // the handler processed every message
	SubscriberGone                       // the subscriber or its node no longer exists
	// Timeout: the outcome is unknown. The handler did not finish within
	// SubscriberTimeout, or its node did not report in time, or the ack
	// was sent at its publisher's deadline before it reported.
	Timeout
	HandlerError // the handler returned an error or panicked
	MailboxFull  // the subscriber's mailbox had no room for the batch
	// OutOfOrder: the subscriber had already received a later batch of the
	// same BatchingProducer (this one was redirected or retried), so it was
	// dropped to keep the producer's order (a retried copy of a batch a
	// subscriber ran, among the last four it ran of the producer, is
	// Delivered: it ran once; not for a group member, whose share may
	// differ between attempts); or, for a chunk of a split
	// batch, it did not run an earlier chunk. Not the subscriber's fault: it
	// never counts towards eviction.
	OutOfOrder
	// DecodeError: the subscriber's codec (a Topic's) rejected the bytes of
	// at least one message; its handler never saw them, and got the batch's
	// valid messages. The publisher sent garbage, the subscriber did nothing
	// wrong: it never counts towards eviction and, as Delivered, ends a run
	// of failures.
	DecodeError

	lastDeliveryStatus = DecodeError // the highest status this version knows
)

// String implements fmt.Stringer.
func (s DeliveryStatus) String() string {
	return enumName(s, "DeliveryStatus", "delivered", "subscriber-gone", "timeout", "handler-error", "mailbox-full", "out-of-order", "decode-error")
}

// AckLevel says what a publish waits for, and what its ack attests.
type AckLevel uint8

const (
	// AckDelivered: the ack comes once every subscriber the owner knew at
	// acceptance processed the batch, failed or timed out, and lists each
	// failure. The default.
	AckDelivered AckLevel = iota
	// AckAccepted: the ack comes once the owner accepted the batch and
	// handed it to its per-node sends. Delivered is 0 and Failures empty;
	// failures still reach events, eviction and at-least-once retries. The
	// owner answers just ahead of those sends, in the same step, so a caller
	// on the owner's own node may return before they are written to NATS.
	AckAccepted
	// AckNone: the call returns once the request is written to NATS, or
	// queued on this node: on the topic's actor when this node owns the
	// topic, else, for messages without keys or headers, merged with the
	// publishes before it into one request that a flusher writes (Close
	// writes what is left). Only what the publisher can see itself is
	// rejected: an invalid topic or message, too large, closed, no owner in
	// its view, its own topic queue full (ErrQueueFull, when this node owns
	// the topic, or when the topic's outbox stays full until ctx ends). A
	// batch the owner refuses (it no longer owns the topic, is not ready,
	// holds a producer's batch back for its order, or is overloaded)
	// is lost and its publisher is not told: the owner counts its messages
	// in Stats().AckNoneRefused and logs it. Merged messages this node
	// cannot write count in Stats().Rejected.
	AckNone
)

// String implements fmt.Stringer.
func (l AckLevel) String() string { return enumName(l, "AckLevel", "delivered", "accepted", "none") }

// WithAck sets what a PublishMessages or Topic.Publish call waits for.
// Default: AckDelivered.
func WithAck(level AckLevel) PublishOption { return func(c *publishConfig) { c.ack = level } }

// PublishAck is the answer to a publish. For Publish and PublishBatch, the
// returned error is non-nil exactly when Status is Rejected, and then
// errors.Is(err, Reason.Err()) holds.
type PublishAck struct {
	Topic     string
	Status    AckStatus
	Reason    Reason            // ReasonNone when Accepted
	Messages  int               // messages in the batch
	Delivered int               // subscribers that processed the whole batch; a consumer group counts once
	Failures  []DeliveryFailure // subscribers that did not, with why
	Level     AckLevel          // what this ack attests (see AckLevel)
}

// DeliveryFailure is one subscriber that did not process a batch. For a
// member of a consumer group Group names the group; a group with no live
// member fails with a zero Subscriber, Group set and SubscriberGone. An ack
// lists a subscriber at most once: a member that failed its own share and a
// share re-routed to it carries the status reported first.
type DeliveryFailure struct {
	Subscriber SubscriberID
	Status     DeliveryStatus
	Group      string
}

// rejected builds a Rejected ack and its error for err.
func rejected(topic string, messages int, err error) (PublishAck, error) {
	r := reasonOf(err)
	if !errors.Is(err, r.Err()) {
		err = fmt.Errorf("%w: %w", r.Err(), err)
	}
	return PublishAck{Topic: topic, Status: Rejected, Reason: r, Messages: messages}, err
}
