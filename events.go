package pubsub

import (
	"sync"
	"sync/atomic"
	"time"
)

// Event is one decision of the library, delivered to EventStream listeners
// as a value of one of the event types of this package (PublishAccepted,
// MemberJoined, ...). The interface is sealed.
type Event interface {
	stamped(node string, at time.Time) Event
}

// PublishAccepted is emitted on the topic's owner when an accepted batch
// settled: every subscriber reported or timed out. A batch answered at its
// publisher's deadline (see PublishBatch) is emitted after that answer,
// with the final counts.
type PublishAccepted struct {
	Node      string // the owner
	Topic     string
	Messages  int
	Delivered int
	Failed    int
	Time      time.Time
}

// PublishRejected is emitted on the publishing node when a publish is
// rejected, whether the node itself or the topic's owner refused it (the
// Reason says why).
type PublishRejected struct {
	Node     string
	Topic    string
	Messages int
	Reason   Reason
	Time     time.Time
}

// DeliverySucceeded is emitted on the owner, once per batch, counting the
// subscribers that processed it.
type DeliverySucceeded struct {
	Node        string
	Topic       string
	Subscribers int
	Messages    int
	Time        time.Time
}

// DeliveryFailed is emitted on the owner for each subscriber that did not
// process a batch.
type DeliveryFailed struct {
	Node       string
	Topic      string
	Subscriber SubscriberID
	Group      string // the subscriber's consumer group (or the group with no live member), or ""
	Status     DeliveryStatus
	Messages   int
	Time       time.Time
}

// SubscriberAdded is emitted on the owner when it records a subscriber.
type SubscriberAdded struct {
	Node       string
	Topic      string
	Subscriber SubscriberID
	Group      string // the subscriber's consumer group, or ""
	Time       time.Time
}

// SubscriberRemoved is emitted on the owner when a subscriber unsubscribes or
// its node leaves.
type SubscriberRemoved struct {
	Node       string
	Topic      string
	Subscriber SubscriberID
	Group      string // the subscriber's consumer group, or ""
	Time       time.Time
}

// SubscriberEvicted is emitted on the owner that evicted a subscriber and on
// the subscriber's node.
type SubscriberEvicted struct {
	Node       string
	Topic      string
	Subscriber SubscriberID
	Group      string         // the subscriber's consumer group, or ""
	Status     DeliveryStatus // the failure that caused it
	Time       time.Time
}

// MemberJoined is emitted on every node whose view gains a member.
type MemberJoined struct {
	Node    string // the node whose view changed
	Member  Member
	Members int // view size after the change
	Time    time.Time
}

// MemberLeft is emitted on every node whose view loses a member.
type MemberLeft struct {
	Node    string
	Member  Member
	Members int
	Time    time.Time
}

// TopicOwnerChanged is emitted on a node that gains or loses ownership of a
// topic it holds state for.
type TopicOwnerChanged struct {
	Node     string
	Topic    string
	OldOwner string
	NewOwner string
	Time     time.Time
}

// MetricsSnapshot carries the node's figures periodically.
type MetricsSnapshot struct {
	Node  string
	Stats Stats
	Time  time.Time
}

// MemberRejected reports heartbeats of a node ignored because the view
// already holds Config.MaxMembers members. It is emitted at most once per
// 10 s per node, however many heartbeats were ignored (Rejected counts them
// since the previous event).
type MemberRejected struct {
	Node     string // the node that ignored it
	Member   string // the ignored node's ID (the latest one)
	Members  int    // members in the view
	Limit    int    // Config.MaxMembers
	Rejected uint64 // heartbeats ignored since the previous event
	Time     time.Time
}

// NodeStopped reports that a node stopped on its own: its NATS connection
// was closed underneath it (by the application, or after nats.go ran out of
// reconnect attempts), or its peers dropped it while it was cut off and a
// new node joined with its ID meanwhile (Err says which). The node ended its
// subscriptions with Err, which wraps ErrClosed, and fails every call with
// ErrClosed. It is not emitted by Close.
type NodeStopped struct {
	Node string
	Err  error
	Time time.Time
}

// QuorumChanged reports, under the KeepMajority partition policy, that the
// node lost or regained sight of a majority of the last stable view. While
// HasQuorum is false it serves no topic as owner.
type QuorumChanged struct {
	Node      string
	HasQuorum bool
	Members   int // members in the current view
	Stable    int // members in the last stable view
	Time      time.Time
}

// EventsDropped tells a listener how many events it lost because it was slow.
type EventsDropped struct {
	Node    string
	Dropped uint64
	Time    time.Time
}

// stamped returns the event with the emitting node and the time set: events
// are built without them, and EventStream.emit fills them in one place.
func (e PublishAccepted) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e PublishRejected) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e DeliverySucceeded) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e DeliveryFailed) stamped(node string, at time.Time) Event { e.Node, e.Time = node, at; return e }
func (e SubscriberAdded) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e SubscriberRemoved) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e SubscriberEvicted) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e MemberJoined) stamped(node string, at time.Time) Event { e.Node, e.Time = node, at; return e }
func (e MemberLeft) stamped(node string, at time.Time) Event   { e.Node, e.Time = node, at; return e }
func (e TopicOwnerChanged) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e MetricsSnapshot) stamped(node string, at time.Time) Event {
	e.Node, e.Time = node, at
	return e
}
func (e EventsDropped) stamped(node string, at time.Time) Event  { e.Node, e.Time = node, at; return e }
func (e MemberRejected) stamped(node string, at time.Time) Event { e.Node, e.Time = node, at; return e }
func (e NodeStopped) stamped(node string, at time.Time) Event    { e.Node, e.Time = node, at; return e }
func (e QuorumChanged) stamped(node string, at time.Time) Event  { e.Node, e.Time = node, at; return e }

// EventStream fans a node's events out to listeners. Emitting never blocks:
// each listener has a bounded buffer and its own goroutine, and a listener
// that falls behind loses events, counted in a later EventsDropped.
type EventStream struct {
	node      string        // the node's ID
	log       *nodeLogger   // the node's, for drops; nil in some tests
	dropped   atomic.Uint64 // events any listener lost (Stats().EventsDropped)
	mu        sync.Mutex
	listeners []*listener
	active    atomic.Int32 // len(listeners), read without the lock on the hot path
	closed    bool
}

// EventBufferSize is the number of events a listener can lag behind.
const EventBufferSize = 1024

type listener struct {
	ch      chan Event
	dropped atomic.Uint64
	// snapshot is set while a MetricsSnapshot waits in ch: a snapshot holds
	// a map of every owned topic, so a listener that fell behind is queued
	// one, not one per MetricsInterval (the later ones count as dropped).
	snapshot atomic.Bool
	stop     chan struct{} // closed by cancel: stop at once
	closing  chan struct{} // closed when the node closes: deliver what is buffered, then stop
	done     chan struct{}
}

func newEventStream(node string) *EventStream { return &EventStream{node: node} }

// Subscribe runs fn for every event, on a goroutine of its own, until cancel
// is called or the node closes (fn is then given the events already
// buffered). cancel waits for that goroutine to end and must not be called
// from fn. Once the node has closed, fn never runs and cancel does nothing.
func (s *EventStream) Subscribe(fn func(Event)) (cancel func()) {
	l := &listener{ch: make(chan Event, EventBufferSize), stop: make(chan struct{}), closing: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		close(l.done)
		return func() {}
	}
	s.listeners = append(s.listeners, l)
	s.active.Store(int32(len(s.listeners)))
	s.mu.Unlock()
	go l.run(s.node, fn)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.remove(l)
			<-l.done
		})
	}
}

func (s *EventStream) remove(l *listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.listeners {
		if x == l {
			s.listeners = append(s.listeners[:i], s.listeners[i+1:]...)
			s.active.Store(int32(len(s.listeners)))
			close(l.stop)
			return
		}
	}
}

func (l *listener) run(node string, fn func(Event)) {
	defer close(l.done)
	deliver := func(e Event) {
		if _, ok := e.(MetricsSnapshot); ok {
			l.snapshot.Store(false)
		}
		if d := l.dropped.Swap(0); d > 0 {
			fn(EventsDropped{Dropped: d}.stamped(node, time.Now()))
		}
		fn(e)
	}
	for {
		select {
		case <-l.stop:
			return
		case <-l.closing:
			// The node's last events (NodeStopped among them) were
			// emitted before it closed the stream: hand them over.
			for {
				select {
				case e := <-l.ch:
					deliver(e)
				default:
					return
				}
			}
		case e := <-l.ch:
			deliver(e)
		}
	}
}

// enabled reports whether anyone listens; callers skip building events
// otherwise, so an unobserved node pays one atomic load per decision.
func (s *EventStream) enabled() bool { return s.active.Load() > 0 }

// emit stamps e with the node and the time and offers it to every listener
// without blocking. It is generic so that an event nobody listens to is never
// boxed: with no listener, emitting costs one atomic load.
func emit[E Event](s *EventStream, e E) {
	if !s.enabled() {
		return
	}
	s.offer(e.stamped(s.node, time.Now()))
}

func (s *EventStream) offer(e Event) {
	dropped := false
	drop := func(l *listener) {
		l.dropped.Add(1)
		s.dropped.Add(1)
		dropped = true
	}
	_, snapshot := e.(MetricsSnapshot)
	s.mu.Lock()
	for _, l := range s.listeners {
		if snapshot && !l.snapshot.CompareAndSwap(false, true) {
			drop(l) // one is still queued
			continue
		}
		select {
		case l.ch <- e:
		default:
			if snapshot {
				l.snapshot.Store(false)
			}
			drop(l)
		}
	}
	s.mu.Unlock()
	if dropped && s.log != nil {
		// A listener stuck in its callback never receives the
		// EventsDropped that would tell it: the node says so too.
		if ok, held := s.log.limit.allow("events/dropped"); ok {
			s.log.Warn("an event listener fell behind: events dropped", "dropped", s.dropped.Load(), "buffer", EventBufferSize, "suppressed", held)
		}
	}
}

// close stops every listener; called by Node.Close.
func (s *EventStream) close() {
	s.mu.Lock()
	ls := s.listeners
	s.listeners, s.closed = nil, true
	s.active.Store(0)
	for _, l := range ls {
		close(l.closing)
	}
	s.mu.Unlock()
}
