package pubsub

import (
	"errors"
	"fmt"
	"time"
)

// ProducerConfig configures a BatchingProducer. A zero field means its
// default; a negative number or duration makes NewBatchingProducer fail with
// ErrInvalidConfig.
type ProducerConfig struct {
	// BatchSize is the largest number of messages in one batch. Default: 2000
	// messages (DefaultBatchSize).
	BatchSize int
	// MaxBatchBytes is the largest size of one batch in bytes, counting each
	// message as its length plus 8 bytes of framing. It is also the largest
	// message Produce accepts: a bigger one is rejected at once with
	// ErrTooLarge. Default: the publisher's MaxMessageSize() when it has that
	// method (a *Node does; then a batch is not split by Node.PublishBatch
	// unless its limit shrank since, a member on a server with a smaller
	// max_payload having joined), else 1 MiB - 64 KiB
	// (DefaultMaxBatchBytes). A message larger than the publisher's
	// MaxMessageSize is rejected at Produce even if MaxBatchBytes is set
	// higher. Both are read once, at NewBatchingProducer.
	MaxBatchBytes int
	// Linger is how long a batch may wait for more messages after its first
	// one was queued, so that it goes out fuller, a duration. Default: 0, no
	// wait: a batch goes as soon as a slot of MaxInFlight is free, and while
	// all slots are busy the next batch fills up (natural batching). A full
	// batch (BatchSize or MaxBatchBytes) never waits, nor does a full queue
	// (MaxQueueSize), nor do batches during Flush and Close.
	Linger time.Duration
	// MaxQueueSize is the largest number of messages waiting in the queue
	// (not counting the batches in flight). Produce past it returns a future
	// already done with ErrQueueFull. Default: 100 000 messages
	// (DefaultMaxQueueSize).
	MaxQueueSize int
	// BlockWhenFull makes Produce and ProduceMessage wait for room while
	// MaxQueueSize messages are queued, instead of returning a future
	// already done with ErrQueueFull: back-pressure for a loop that
	// produces faster than the cluster takes messages, as Kafka clients
	// that block on a full buffer give. The wait ends when the producer
	// cuts its next batch from the queue, when the message's ctx ends (its
	// future then completes with ctx's error, ReasonCancelled: nothing was
	// queued), or when the producer closes or stops (ErrClosed). A
	// producer stuck on an owner that does not answer holds the caller for
	// up to PublishTimeout per attempt, and as long as OnPublishError keeps
	// retrying: give ctx a deadline where that matters. Blocked callers get
	// room in no particular order; one goroutine's messages keep theirs.
	// Default: false, and Produce never blocks.
	BlockWhenFull bool
	// PublishTimeout bounds each attempt to publish a batch (and the
	// Initialize call before the first one), a duration. An attempt that
	// times out fails with an error wrapping ErrTimeout and
	// context.DeadlineExceeded; its outcome is unknown. One that timed out
	// while no owner would take it (none ready, or a KeepMajority minority)
	// fails with ErrTopicUnavailable, also wrapping context.DeadlineExceeded:
	// nothing was published.
	//
	// Default, with a *Node publisher: the node's SubscriberTimeout +
	// RequestTimeout (the longest the node waits for the owner's answer,
	// which itself outlives the owner's wait for subscribers) plus 1s;
	// 11s with the node's default timeouts. An attempt then outlives the
	// owner's wait, so a slow or blocked subscriber shows up as a Timeout
	// failure in an Accepted ack (and is evicted as the node's EvictAfter
	// says) instead of failing the batch, or, with FailBatchAndStop,
	// stopping the producer for every subscriber. With any other Publisher:
	// DefaultPublishTimeout (11s); set it explicitly for a Publisher that
	// wraps a *Node with other timeouts.
	//
	// An explicit value shorter than a *Node's wait is honoured (the node
	// logs it once): the owner answers each attempt just before it ends,
	// the subscribers that have not reported by then listed as Timeout
	// (outcome unknown) in an Accepted ack. An attempt the owner cannot
	// answer in time (unreachable, stalled) times out with an unknown
	// outcome, and OnPublishError decides what follows.
	PublishTimeout time.Duration
	// MaxInFlight is the number of batches published at once: a batch
	// counts from its first attempt until its futures complete, so a stuck
	// batch holds back at most MaxInFlight-1 batches behind it. Batches are
	// issued in order and their futures complete in order whatever the
	// value. More than one batch is in flight only when the Publisher can
	// report when a batch's place in the order is fixed (an unexported
	// capability, for publishers of this package); with any other Publisher
	// the next batch starts once the previous call returned, since
	// concurrent calls could be reordered. At any value a subscriber never
	// handles a producer's batch after a later one: a late retried copy is
	// dropped and reported OutOfOrder in its ack's Failures (Delivered by a
	// subscriber that ran the first copy, among the last four batches of
	// the producer it ran; not a group member). Default: 4
	// batches (DefaultMaxInFlight; it was 1 until 4 measured faster for
	// every producer scenario).
	MaxInFlight int
	// OnPublishError decides what happens to a batch whose publish attempt
	// failed: attempt counts the failed attempts of that batch, from 1; err
	// is the attempt's error. It is called on the producer's goroutine and
	// must return quickly and not panic. It sees timeouts (ErrTimeout),
	// ErrTopicUnavailable, ErrQueueFull from an owner that stayed
	// overloaded (nothing published: a RetryBatch with a delay backs off)
	// and any error of a custom Publisher; it is not
	// called for rejections that no retry can fix: ErrTooLarge and
	// ErrInvalidTopic fail the batch only, and ErrClosed from the publisher
	// (a closed Node) fails the batch and stops the producer. Default: nil,
	// which always decides FailBatchAndStop.
	OnPublishError func(attempt int, err error) ErrorDecision
	// AckLevel is what each batch's publish waits for (see AckLevel); the
	// futures complete with acks of that level, in order. With AckAccepted
	// or AckNone a batch settles sooner, so the next one starts sooner.
	// Default: AckDelivered.
	AckLevel AckLevel
}

// Defaults of ProducerConfig.
const (
	DefaultBatchSize     = 2000           // messages per batch
	DefaultMaxBatchBytes = 1<<20 - 64<<10 // bytes per batch when the publisher has no MaxMessageSize
	DefaultMaxQueueSize  = 100_000        // queued messages
	DefaultMaxInFlight   = 4              // batches in flight
)

// DefaultPublishTimeout (11s) is PublishTimeout's default for a Publisher
// other than *Node: the attempt timeout a *Node with the default
// SubscriberTimeout and RequestTimeout gets (their sum plus 1s). A *Node
// publisher's default follows its own timeouts instead (see
// ProducerConfig.PublishTimeout).
const DefaultPublishTimeout = DefaultSubscriberTimeout + DefaultRequestTimeout + publishWaitMargin

// resolve fills the defaults of c's zero fields for publisher p, then
// validates it (see Config.resolve).
func (c *ProducerConfig) resolve(p Publisher) error {
	if c.OnPublishError == nil {
		c.OnPublishError = func(int, error) ErrorDecision { return FailBatchAndStop }
	}
	maxBatchBytes, publishTimeout := defaultMaxBatchBytes(p), defaultPublishTimeout(p)
	orDefault(&c.BatchSize, DefaultBatchSize)
	orDefault(&c.MaxBatchBytes, maxBatchBytes)
	orDefault(&c.MaxQueueSize, DefaultMaxQueueSize)
	orDefault(&c.PublishTimeout, publishTimeout)
	orDefault(&c.MaxInFlight, DefaultMaxInFlight)
	return errors.Join(
		notNegative("BatchSize", c.BatchSize, DefaultBatchSize, " messages"),
		notNegative("MaxBatchBytes", c.MaxBatchBytes, maxBatchBytes, " bytes"),
		notNegative("Linger", c.Linger, 0, ", no wait"),
		notNegative("MaxQueueSize", c.MaxQueueSize, DefaultMaxQueueSize, " messages"),
		notNegative("PublishTimeout", c.PublishTimeout, publishTimeout, " for this publisher"),
		notNegative("MaxInFlight", c.MaxInFlight, DefaultMaxInFlight, " batches"),
		c.checkAckLevel(p),
	)
}

// checkAckLevel refuses a level that is not one, and a level other than
// AckDelivered through a Publisher that cannot carry it (only a *Node can,
// or a Publisher with PublishMessages).
func (c *ProducerConfig) checkAckLevel(p Publisher) error {
	if c.AckLevel > AckNone {
		return fmt.Errorf("%w: AckLevel %s is not an AckLevel", ErrInvalidConfig, c.AckLevel)
	}
	_, ordered := p.(orderedPublisher)
	_, messages := p.(messagePublisher)
	if c.AckLevel != AckDelivered && !ordered && !messages {
		return fmt.Errorf("%w: AckLevel %s needs a *Node or a Publisher with PublishMessages; %T has neither", ErrInvalidConfig, c.AckLevel, p)
	}
	return nil
}

// messageLimit is the largest message p accepts: its MaxMessageSize when it
// has that method, else 0 (no limit of its own).
func messageLimit(p Publisher) int {
	if s, ok := p.(messageSizer); ok {
		return s.MaxMessageSize()
	}
	return 0
}

// defaultMaxBatchBytes is ProducerConfig.MaxBatchBytes's default for
// publisher p.
func defaultMaxBatchBytes(p Publisher) int {
	if limit := messageLimit(p); limit > 0 {
		return limit
	}
	return DefaultMaxBatchBytes
}

// batchOverhead is what a message costs in a batch beyond its data: the
// framing Node.PublishBatch counts when it splits a batch. Counting the same
// way keeps a batch within MaxBatchBytes = Node.MaxMessageSize() in one
// request, so batches cannot interleave.
const batchOverhead = 8

// futureSlab is how many futures Produce allocates at once: a deep queue
// holds a million of them, and the GC marks fewer, larger objects faster
// (a deep burst ran about 5% faster than with 64). A future kept alive
// keeps its slab, 16 KiB, and the results its 511 neighbours point to.
const futureSlab = 512

// ErrorDecision is what OnPublishError decides for a failed batch. Compare
// decisions with ==; the zero value is FailBatchAndStop.
type ErrorDecision struct {
	action errorAction
	delay  time.Duration
}

type errorAction uint8

const (
	actionStop errorAction = iota
	actionContinue
	actionRetry
)

var (
	// FailBatchAndStop fails the batch, fails every queued message with
	// ErrClosed and stops the producer: a later Produce returns ErrClosed.
	// Batches already in flight behind it (MaxInFlight > 1) keep the
	// outcome of their own publish, except that an owner holding one back
	// until the failed batch settles never lets it through: it fails.
	FailBatchAndStop = ErrorDecision{action: actionStop}
	// FailBatchAndContinue fails the batch and goes on with the next one.
	FailBatchAndContinue = ErrorDecision{action: actionContinue}
)

// RetryBatch retries the batch after the given delay (a negative delay
// counts as 0). Close cuts the wait short when its context ends. Messages
// whose context ended meanwhile are left out of the retry, unless an
// attempt of the batch had an unknown outcome (ReasonTimeout): the retry
// then sends the same messages (see Produce), so that subscribers that ran
// part of it are not mistaken about the rest.
func RetryBatch(after time.Duration) ErrorDecision {
	return ErrorDecision{action: actionRetry, delay: max(after, 0)}
}

// String implements fmt.Stringer.
func (d ErrorDecision) String() string {
	switch d.action {
	case actionStop:
		return "fail-batch-and-stop"
	case actionContinue:
		return "fail-batch-and-continue"
	case actionRetry:
		return fmt.Sprintf("retry-batch(%v)", d.delay)
	}
	return fmt.Sprintf("ErrorDecision(%d)", d.action)
}
