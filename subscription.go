package pubsub

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Handler processes one message. It runs on the subscription's own goroutine,
// one message at a time, in the order the owner accepted them. ctx expires
// after SubscriberTimeout for the batch (the owner's, if shorter) and is
// cancelled when the node closes. Returning an error (or panicking)
// reports HandlerError for the batch and stops its remaining messages for
// this subscriber.
type Handler func(ctx context.Context, m *Message) error

// Message is one delivered message. The subscribers of one node share it:
// treat it, Data and Header as read-only (copy them to keep a changed
// version). They are the handler's only while it runs. The *Message
// itself is reused for a later batch once every handler of its batch on
// this node has returned, so keep a copy of the struct (kept := *m), never
// m, past the handler, or in a goroutine it starts. Published on this
// node, Data and Header may be the publisher's own memory, which it may
// reuse once its publish returned (or its producer's future completed), so
// copy them (bytes.Clone) to keep them past the handler; received from
// another node, Data, Key and the header's strings refer to the batch's
// buffer, and keeping one keeps the whole batch in memory (strings.Clone
// what you keep for long). SubscriberFromContext tells a handler shared by
// several subscriptions which one it runs for.
type Message struct {
	Topic string
	Data  []byte
	// Key is the routing key the message was published with, or "".
	Key string
	// Header is the header the message was published with (plus what a
	// Propagator injected), or nil. Messages with equal headers may share
	// one map.
	Header Header
	// Publisher is the ID of the node that published the message, as the
	// request named it (anyone who may publish on the node subjects can
	// claim any ID).
	Publisher string
}

type subscriberKey struct{}

// SubscriberFromContext returns the subscription a handler's ctx belongs to.
func SubscriberFromContext(ctx context.Context) (SubscriberID, bool) {
	id, ok := ctx.Value(subscriberKey{}).(SubscriberID)
	return id, ok
}

// SubscriberID names one subscription in the cluster.
type SubscriberID struct {
	Node  string // the subscriber's Node.ID()
	Local string // unique on that node, across restarts
}

// String returns "node/local".
func (id SubscriberID) String() string { return id.Node + "/" + id.Local }

// Group returns the consumer group of the subscriber (the part of Local
// after "@"), or "".
func (id SubscriberID) Group() string { return groupOf(id.Local) }

// Subscription is one handler registered for one topic.
type Subscription struct {
	node    *Node
	topic   string
	id      SubscriberID
	handler Handler
	mailbox serial
	// producers holds the last batch number of each BatchingProducer handed
	// to the handler; only the mailbox's work touches it.
	producers producerMarks[producerMark]
	// rerouted holds, per producer, the last group share re-routed to this
	// subscription and its outcome, to answer a copy of it; only the
	// mailbox's work touches it.
	rerouted producerMarks[producerMark]
	// lastBatch is the owner's number of the last batch handed to the
	// handler; only the mailbox's work touches it.
	lastBatch batchSeq
	// lastStatus is the outcome of the last batch run, the answer to a copy
	// of it; only the mailbox's work touches it.
	lastStatus DeliveryStatus
	// refused holds the producer batches whose share a full mailbox
	// refused (group members only), to refuse a retry's copy too.
	refused refusedShares
	// split: the chunks of split batches that reached it (split_chain.go).
	split splitChain

	once sync.Once
	done chan struct{}
	mu   sync.Mutex
	err  error
	// stopped is made by the first Stopped call (most subscriptions never
	// make one: a channel is about 100 bytes) and closed, under mu, by the
	// mailbox after the end's running batch, which sets it to closedChan
	// when no call made it.
	stopped chan struct{}
}

// closedChan is the Stopped of a subscription that stopped before anyone
// asked.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Topic returns the subscribed topic.
func (s *Subscription) Topic() string { return s.topic }

// ID returns the subscription's cluster-wide ID.
func (s *Subscription) ID() SubscriberID { return s.id }

// Group returns the consumer group the subscription belongs to (WithGroup),
// or "" when it gets every message.
func (s *Subscription) Group() string { return s.id.Group() }

// Done is closed when the subscription ends: Unsubscribe, eviction, or Close
// of its node.
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Stopped is closed once the subscription has ended (Done) and its handler
// has returned from its last call: no call is running and none will start.
// Done closes at the end itself, while a call handed its message just
// before may still run; wait on Stopped before releasing what the handler
// uses. A handler that never returns keeps Stopped open, so wait with a
// deadline, and never from the subscription's own handler, which would
// wait for itself.
func (s *Subscription) Stopped() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped == nil {
		s.stopped = make(chan struct{})
	}
	return s.stopped
}

// Err says why the subscription ended: nil while active and after
// Unsubscribe; an error wrapping ErrEvicted after eviction; ErrClosed after
// Close of its node (an error wrapping it for one evicted while the node
// drained, naming the failure), and an error wrapping ErrClosed after the
// node stopped on its own (NodeStopped): test with errors.Is.
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *Subscription) isDone() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// end finishes the subscription once, with err as its reason.
func (s *Subscription) end(err error) {
	s.once.Do(func() {
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
		close(s.done)
		s.releaseMailbox()
		// Its marks go back to the node's budget on the mailbox, after the
		// batch running now (which still records its mark and holds the
		// last handler call): work queued later sees the subscription done,
		// records none and calls no handler, so Stopped closes here too. A
		// handler that never returns keeps them counted, as it keeps the
		// map, and Stopped open.
		s.mailbox.doUpTo(func() {
			s.producers.forgetAll(s.node)
			s.rerouted.forgetAll(s.node)
			s.mu.Lock()
			if s.stopped == nil {
				s.stopped = closedChan
			} else {
				close(s.stopped)
			}
			s.mu.Unlock()
		}, 0)
	})
}

// releaseMailbox reports the batches still queued in an ended
// subscription's mailbox without waiting for the handler running ahead of
// them: one that never returns would hold them for good. Each sees the
// subscription done (handle) and is reported SubscriberGone (or Timeout,
// past its deadline) without touching the subscription's state, so they
// may run beside that handler.
func (s *Subscription) releaseMailbox() {
	queued := s.mailbox.take()
	if len(queued) == 0 {
		return
	}
	if s.mailbox.goroutines != nil {
		s.mailbox.goroutines.add()
	}
	go func() {
		if s.mailbox.goroutines != nil {
			defer s.mailbox.goroutines.done()
		}
		for _, f := range queued {
			f()
		}
	}()
}

// Subscribe registers h for topic and returns once the topic's owner has
// recorded the subscription: every publish the owner accepts afterwards
// reaches h, until Unsubscribe, eviction or Close. On error it returns a nil
// *Subscription. The subscription is registered on this node before the
// owner answers, and the owner may deliver to it as soon as it learns of
// it: h can run for messages published while Subscribe was pending even
// when Subscribe then fails (its ctx ended before the answer came back,
// behind a stalled route, say). Those deliveries count in their acks, as
// h ran; after Subscribe returned the error, h may finish the message it
// is handling but is given no other (with no Subscription to wait on
// Stopped, only the node's Close waits for that call). A Subscribe that
// fails after its request left tells the owner to forget the subscriber,
// in one attempt it does not wait for (a group member's is left for the
// next delivery to find gone, so a group whose members all vanished stays
// reported).
//
// It fails with ErrInvalidTopic, ErrInvalidConfig (a nil h, an invalid
// option), ErrClosed (also when the NATS connection is closed or being
// drained), ErrTopicUnavailable (no owner served the topic within
// RequestTimeout, or before ctx ended, or the owner refused it past its
// bound of subscriber records, saying so), ErrQueueFull (the owner's
// queue for the topic is full: at once when this node is the owner, else
// once it stayed full for RequestTimeout; retry later), ErrTimeout (the owner did not answer in
// time), ErrTooManySubscriptions (this node holds 1 048 576 already), or
// ctx's error.
func (n *Node) Subscribe(ctx context.Context, topic string, h Handler, opts ...SubscribeOption) (*Subscription, error) {
	if err := validateTopic(topic); err != nil {
		return nil, err
	}
	if h == nil {
		// Wrapped like every error of the package, as NewTopic's nil codec is.
		return nil, fmt.Errorf("%w: subscribe %q: nil handler", ErrInvalidConfig, topic)
	}
	cfg, err := newSubscribeConfig(&n.cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("pubsub: subscribe %q: %w", topic, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pubsub: subscribe %q: %w", topic, err)
	}
	local := n.subscriber.newLocal()
	if cfg.group != "" {
		// The group travels with the ID through every request, sync and
		// handover that names the subscriber.
		local += groupMark + cfg.group
	}
	s := &Subscription{node: n, topic: topic, id: SubscriberID{Node: n.self.ID, Local: local}, handler: h, done: make(chan struct{})}
	s.mailbox.limit = cfg.mailboxSize
	s.mailbox.goroutines = &n.life.goroutines
	// Registered locally first: the node is the source of truth, so a sync
	// sent during the request already carries it.
	if err := n.subscriber.add(s, n.life.closed.Load); err != nil {
		return nil, fmt.Errorf("pubsub: subscribe %q: %w", topic, err)
	}
	issued := false
	if err := n.registerWithOwnerIssued(ctx, s, false, &issued); err != nil {
		n.subscriber.remove(local, "")
		s.end(err)
		if issued && cfg.group == "" {
			n.subscriber.pushWritten() // as in Unsubscribe
			// The owner may have recorded it (the ctx ended, or the answer
			// was lost, after the request left): without a word it would
			// keep the subscriber, and its topic's actor, until a delivery
			// found it gone. Not a group member: to the owner an
			// unsubscribe of a group's last member ends the group silently,
			// where one whose members all vanished is still reported in
			// acks; a leftover member is found gone by the next delivery,
			// which keeps that report.
			n.forgetAtOwner(s)
		}
		return nil, fmt.Errorf("pubsub: subscribe %q: %w", topic, err)
	}
	n.log.Debug("subscribed", "topic", topic, "subscriber", s.id.String())
	return s, nil
}

// Unsubscribe removes the subscription locally (so no further message reaches
// its handler) and then at the owner, and returns once the owner
// acknowledged. A batch its handler is running when it ends stops after the
// current message and counts as SubscriberGone for it, not Delivered. The
// subscription is checked right before each handler call, so after the end
// no message is handed to the handler; a call handed its message just
// before may still be starting, as with a nats.go subscription: Unsubscribe
// does not wait for the handler, which may be the caller (Stopped closes
// once the handler has returned). A consumer group's other members get the
// rest of its share. The subscription is ended either way; the error
// (ErrTopicUnavailable, ErrTimeout or ctx's) says the owner did not
// confirm: it forgets the subscriber when a delivery finds it gone.
// Unsubscribing an ended subscription, or one whose node is closing,
// returns nil.
func (s *Subscription) Unsubscribe(ctx context.Context) error {
	n := s.node
	if n.subscriber.remove(s.id.Local, "") == nil {
		return nil
	}
	s.end(nil)
	n.subscriber.pushWritten()
	if err := n.registerWithOwner(ctx, s, true); err != nil {
		return fmt.Errorf("pubsub: unsubscribe %s from %q: %w", s.id, s.topic, err)
	}
	return nil
}

// registerWithOwner sends a subscribe (or unsubscribe) to the topic's owner
// and waits for its acknowledgement, following ownership changes.
func (n *Node) registerWithOwner(ctx context.Context, s *Subscription, unsubscribe bool) error {
	return n.registerWithOwnerIssued(ctx, s, unsubscribe, nil)
}

// registerWithOwnerIssued is registerWithOwner, setting *issued once a
// request was queued on the local actor or written to the connection.
func (n *Node) registerWithOwnerIssued(ctx context.Context, s *Subscription, unsubscribe bool, issued *bool) error {
	req := &wire.SubscribeRequest{From: n.selfRef(), Topic: s.topic, Subscriber: s.id.Local, Unsubscribe: unsubscribe}
	var o ownerCall
	if issued != nil {
		o.issued = func() { *issued = true }
	}
	_, err := n.toOwner(ctx, s.topic, subscribeRequest{req}, o)
	if (errors.Is(err, ErrClosed) || errors.Is(err, errClosedInFlight)) && unsubscribe {
		return nil // our own node is closing: the owner drops us anyway
	}
	return err
}

// forgetAtOwner tells the topic's owner, without waiting for an answer and
// in one attempt, that a subscription whose Subscribe failed is gone. It
// follows the subscribe on the same path (the local actor's queue, or this
// node's connection to the owner's inbox), so the owner reads it after
// the subscribe. Lost (no owner, queue full, a write error), the owner
// keeps the subscriber until a delivery finds it gone, as before.
func (n *Node) forgetAtOwner(s *Subscription) {
	req := &wire.SubscribeRequest{From: n.selfRef(), Topic: s.topic, Subscriber: s.id.Local, Unsubscribe: true}
	once, cancel := context.WithCancel(context.Background())
	cancel() // one attempt: toOwner does not pause for a retry
	if _, err := n.toOwner(once, s.topic, subscribeRequest{req}, ownerCall{noAnswer: true}); err != nil {
		n.log.Debug("telling the owner of a failed subscribe failed", "topic", s.topic, "subscriber", s.id.String(), "err", err)
	}
}
