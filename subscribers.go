package pubsub

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// subscriberSide is the node as subscriber: its own subscriptions, the
// source of truth the topics' owners pull (handoff.go), and the at-least-once
// batches it received recently, for duplicate suppression (delivery.go).
type subscriberSide struct {
	mu      sync.RWMutex
	subs    map[string]*Subscription // by SubscriberID.Local
	byTopic map[string]int           // subscriptions per topic, consumer-group members left out
	next    atomic.Uint64
	tag     string // makes SubscriberID.Local unique across incarnations
	max     int    // subscriptions at most (maxSubscriptions; tests lower it)

	recentMu sync.Mutex
	recent   map[batchKey]*recentBatch

	// pushMu is held while a pushed sync is built and written
	// (handoff.go). Taken before mu.
	pushMu sync.Mutex
}

// pushWritten returns once no pushed sync built before this call is still
// being written. A subscription removed, then this, then its unsubscribe
// request sent: a push that named it leaves first, on the same connection
// to the same owner, so the owner never reads the push second and adds it
// back. The subscription is removed (and ended) before: its handler gets
// nothing more while a large push is written.
func (s *subscriberSide) pushWritten() {
	s.pushMu.Lock()
	//lint:ignore SA2001 an empty critical section is the point: a barrier behind the push being written
	s.pushMu.Unlock()
}

func (s *subscriberSide) init() {
	s.subs = make(map[string]*Subscription)
	s.byTopic = make(map[string]int)
	s.recent = make(map[batchKey]*recentBatch)
	s.tag = strconv.FormatUint(randomUint64()&0xffffffff, 36)
	s.max = maxSubscriptions
}

// namesOwn reports whether d names a subscriber of this incarnation (by
// the tag its subscriptions' local IDs start with).
func (s *subscriberSide) namesOwn(d *wire.DeliverBatch) bool {
	prefix := s.tag + "-"
	for _, l := range d.GetSubscribers() {
		if strings.HasPrefix(l, prefix) {
			return true
		}
	}
	for _, sh := range d.GetShares() {
		if strings.HasPrefix(sh.GetSubscriber(), prefix) {
			return true
		}
	}
	return false
}

// newLocal names a new subscription.
func (s *subscriberSide) newLocal() string {
	return s.tag + "-" + strconv.FormatUint(s.next.Add(1), 36)
}

// maxSubscriptions bounds a node's own subscriptions. A topic's owner
// holds at most maxOwnerRecords subscriber records, so a node that could
// hold more would have owners refuse or drop some of them.
const maxSubscriptions = maxOwnerRecords

// add registers sub unless closed reports the node closed (ErrClosed) or
// it holds s.max subscriptions already (ErrTooManySubscriptions), under the
// lock shutdown takes, so no subscription is added after shutdown ended
// them all.
func (s *subscriberSide) add(sub *Subscription, closed func() bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if closed() {
		return ErrClosed
	}
	if len(s.subs) >= s.max {
		return fmt.Errorf("%w: the node holds %d, its bound: unsubscribe what is not used, or subscribe from more nodes", ErrTooManySubscriptions, len(s.subs))
	}
	s.subs[sub.id.Local] = sub
	if sub.id.Group() == "" {
		s.byTopic[sub.topic]++
	}
	return nil
}

// limit returns the subscriptions a node may hold.
func (s *subscriberSide) limit() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.max
}

// subscribes reports whether this node has a subscription to topic that
// gets every message (not a consumer-group member's: see keptFor).
func (s *subscriberSide) subscribes(topic string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byTopic[topic] > 0
}

// remove unregisters local and returns the subscription it was, if it was
// registered for topic (any topic when topic is "").
func (s *subscriberSide) remove(local, topic string) *Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	sub := s.subs[local]
	if sub == nil || (topic != "" && sub.topic != topic) {
		return nil
	}
	delete(s.subs, local)
	if sub.id.Group() == "" {
		if s.byTopic[sub.topic]--; s.byTopic[sub.topic] <= 0 {
			delete(s.byTopic, sub.topic)
		}
	}
	return sub
}

// stillHeld returns topics with only the subscribers still registered
// for their topic; topics left with none are left out.
func (s *subscriberSide) stillHeld(topics []*wire.TopicSubscribers) []*wire.TopicSubscribers {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var held []*wire.TopicSubscribers
	for _, t := range topics {
		var locals []string
		for _, l := range t.GetSubscribers() {
			if sub := s.subs[l]; sub != nil && sub.topic == t.GetTopic() {
				locals = append(locals, l)
			}
		}
		if len(locals) > 0 {
			held = append(held, &wire.TopicSubscribers{Topic: t.GetTopic(), Subscribers: locals})
		}
	}
	return held
}

// takeAll unregisters and returns every subscription.
func (s *subscriberSide) takeAll() map[string]*Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	subs := s.subs
	s.subs = map[string]*Subscription{}
	s.byTopic = map[string]int{}
	return subs
}

// each calls fn for every subscription under the read lock; fn must not
// block.
func (s *subscriberSide) each(fn func(local string, sub *Subscription)) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for local, sub := range s.subs {
		fn(local, sub)
	}
}

// ownedBy lists this node's subscriptions of the topics owner owns under
// v, grouped by topic.
func (s *subscriberSide) ownedBy(v *view, owner string) []*wire.TopicSubscribers {
	byTopic := map[string]*wire.TopicSubscribers{}
	var out []*wire.TopicSubscribers
	s.eachOwnedBy(v, owner, func(topic, local string) {
		t := byTopic[topic]
		if t == nil {
			t = &wire.TopicSubscribers{Topic: topic}
			byTopic[topic] = t
			out = append(out, t)
		}
		t.Subscribers = append(t.Subscribers, local)
	})
	return out
}

// eachOwnedBy calls fn for each subscription whose topic owner owns under
// v, hashing each topic once however many subscriptions it has.
func (s *subscriberSide) eachOwnedBy(v *view, owner string, fn func(topic, local string)) {
	owned := map[string]bool{}
	s.each(func(local string, sub *Subscription) {
		is, known := owned[sub.topic]
		if !known {
			is = v.ownerOf(sub.topic).ID == owner
			owned[sub.topic] = is
		}
		if is {
			fn(sub.topic, local)
		}
	})
}

// forgetRecent drops remembered at-least-once batches old enough that no
// copy can still come.
func (s *subscriberSide) forgetRecent(horizon time.Time) {
	s.recentMu.Lock()
	defer s.recentMu.Unlock()
	for k, rb := range s.recent {
		if rb.report != nil && rb.at.Before(horizon) {
			delete(s.recent, k)
		}
	}
}
