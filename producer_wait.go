package pubsub

import (
	"log/slog"
	"time"
)

// publishWaitMargin is how much longer than its publisher's own wait a
// producer's attempt lasts by default, so that the publisher's answer (an
// ack listing a timed-out subscriber, or the publisher's own ErrTimeout)
// always arrives before the producer gives up on the attempt.
const publishWaitMargin = time.Second

// publishWaiter is implemented by a Publisher that bounds each publish
// attempt itself and can say by how much. *Node does: it waits up to
// SubscriberTimeout + RequestTimeout for the owner's answer, and the owner
// waits less than that for the subscriber nodes' reports (SubscriberTimeout
// + RequestTimeout/2), so the owner's ack, failures included, comes back
// within the node's wait.
type publishWaiter interface {
	// publishWait is the longest a publish attempt waits for its outcome.
	publishWait() time.Duration
}

// publisherLogger is implemented by a Publisher with a logger a producer
// may log about it on. *Node does.
type publisherLogger interface {
	logger() *slog.Logger
}

// defaultPublishTimeout is ProducerConfig.PublishTimeout's default for
// publisher p: its own wait plus publishWaitMargin when it reports one
// (a *Node), else DefaultPublishTimeout.
//
// The producer's attempt must outlive the publisher's wait, which outlives
// the owner's wait for subscribers: otherwise one blocked subscriber makes
// every attempt time out just before the owner's ack arrives, the batch
// fails although it was delivered to everyone else, and with the default
// FailBatchAndStop the producer stops for every subscriber (guarantee 6,
// isolation, broken by a default).
func defaultPublishTimeout(p Publisher) time.Duration {
	if w, ok := p.(publishWaiter); ok {
		if d := w.publishWait(); d > 0 {
			return d + publishWaitMargin
		}
	}
	return DefaultPublishTimeout
}

// warnShortPublishTimeout logs, on a *Node publisher's logger, that a
// resolved PublishTimeout does not outlive the node's own wait. Only an
// explicit value can: the default is the wait plus publishWaitMargin.
//
// Such a value is allowed rather than rejected with ErrInvalidConfig: a
// producer may rightly prefer acks by a deadline of its own to waiting for
// a slow subscriber, the contract honours explicit values, and rejecting
// would make a producer's configuration valid or not depending on node
// timeouts set elsewhere. Each attempt tells the owner its deadline, and
// the owner answers before it (answer_by.go), so the message says what
// the acks will then hold.
func warnShortPublishTimeout(p Publisher, topic string, timeout time.Duration) {
	w, ok := p.(publishWaiter)
	l, logs := p.(publisherLogger)
	if !ok || !logs || l.logger() == nil {
		return
	}
	if wait := w.publishWait(); timeout <= wait {
		l.logger().Info("producer PublishTimeout is shorter than the node's wait for the owner: subscribers that have not reported by then are listed as Timeout (outcome unknown) in its acks; leave PublishTimeout zero for the default",
			"topic", topic, "publishTimeout", timeout, "nodeWait", wait, "default", wait+publishWaitMargin)
	}
}
