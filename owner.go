package pubsub

import (
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// ownerSide is the node as topic owner: one actor per topic it holds state
// for, and the registry that collects the members' subscriptions when
// ownership moves (handoff.go). mu guards topics and seqFloor.
type ownerSide struct {
	n        *Node
	mu       sync.Mutex
	topics   map[string]*topicActor
	seqFloor uint64 // the highest batch number of a collected actor
	registry syncRegistry
	inflight atomic.Int64 // accepted batches not yet answered, for a draining Close
	// inflightBytes is what the inflight batches hold; budget bounds it
	// (maxOwnerInflightBytes; tests lower it).
	inflightBytes atomic.Int64
	budget        atomic.Int64
	// queued counts publish requests from the inbox from before the drain
	// check until their actor took them (then inflight counts them): a
	// draining Close waits for both, or a request that passed the check
	// just before the drain began would be served after the node left.
	queued atomic.Int64
	// records counts the subscriber records of every actor (the sum of
	// their counts); maxRecords bounds it (maxOwnerRecords; tests lower it).
	records, maxRecords atomic.Int64
}

func (o *ownerSide) init(n *Node) {
	o.n = n
	o.topics = make(map[string]*topicActor)
	o.budget.Store(maxOwnerInflightBytes)
	o.maxRecords.Store(maxOwnerRecords)
	o.registry.init(n)
	o.registry.reset(n.view(), nil, 0, viewChange{})
}

// names lists the topics that have an actor.
func (o *ownerSide) names() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Collect(maps.Keys(o.topics))
}

// actor returns the topic's actor, creating it.
func (o *ownerSide) actor(topic string) *topicActor {
	o.mu.Lock()
	defer o.mu.Unlock()
	a := o.topics[topic]
	if a == nil {
		// Batch numbers start above those of every collected actor (and at
		// the creation time, for other incarnations' sake), so an actor made
		// again numbers its batches above the old one's: subscribers drop
		// batches numbered below the last they saw.
		now := time.Now()
		seq := max(uint64(now.UnixNano()), o.seqFloor)
		a = &topicActor{n: o.n, topic: topic, reconciled: reconciled{epoch: noEpoch, synced: noEpoch}, seq: seq, collection: collection{used: now}}
		a.s.goroutines = &o.n.life.goroutines
		o.topics[topic] = a
	}
	return a
}

// maxOwnerInflightBytes and maxOwnerInflightBatches bound the batches a
// node accepted as owner and has not settled: an AckAccepted or AckNone
// publish is answered at once, so a publisher goes on while a node that
// does not report (a stalled route) holds each delivery until
// SubscriberTimeout; without a bound the owner would hold publish rate x
// SubscriberTimeout of messages. Past either, publishes are refused
// (NOT_READY: publishers retry within RequestTimeout) until deliveries
// settle.
const (
	maxOwnerInflightBytes   = 256 << 20
	maxOwnerInflightBatches = 1 << 16
)

// reserve counts a batch of size bytes in flight if it fits the budget,
// and reports whether it did. One batch always fits when nothing is in
// flight, however large. Added first and taken back when over, so actors
// reserving at once never overshoot the budget together.
func (o *ownerSide) reserve(size int) bool {
	held := o.inflightBytes.Add(int64(size))
	batches := o.inflight.Add(1)
	if held == int64(size) || (held <= o.budget.Load() && batches <= maxOwnerInflightBatches) {
		return true
	}
	o.release(size)
	return false
}

// release takes a batch of size bytes out of the in-flight count.
func (o *ownerSide) release(size int) {
	o.inflight.Add(-1)
	o.inflightBytes.Add(-int64(size))
}

// refuseOverBudget counts and logs a batch refused for the in-flight
// budget, and returns the reason its publisher is told.
func (n *Node) refuseOverBudget(topic string) string {
	n.stats.refused.Add(1)
	held, batches := n.owner.inflightBytes.Load(), n.owner.inflight.Load()
	if ok, suppressed := n.log.limit.allow("refused/inflight"); ok {
		n.log.Warn("publish refused: deliveries in flight over budget (subscriber nodes not reporting?)", "topic", topic,
			"inflight_bytes", held, "inflight_batches", batches, "limit_bytes", n.owner.budget.Load(), "limit_batches", maxOwnerInflightBatches, "suppressed", suppressed)
	}
	return fmt.Sprintf("its deliveries in flight hold %d bytes in %d batches, over its budget (%d bytes, %d batches) until subscriber nodes report", held, batches, n.owner.budget.Load(), maxOwnerInflightBatches)
}

// maxOwnerRecords bounds the subscriber records a node holds as owner,
// over all the topics it owns: subscribe requests carry the subscriber's
// node and ID unverified, so without a bound anyone who can publish on the
// cluster's subjects could grow them without end. A node holds at most as
// many subscriptions of its own (maxSubscriptions), so only a topic owner
// that about a million subscribers across the cluster subscribe through
// would reach it.
const maxOwnerRecords = 1 << 20

// recordsAdmit reports whether one more subscriber record fits.
func (o *ownerSide) recordsAdmit() bool {
	return o.records.Load() < o.maxRecords.Load()
}

// refuseRecords counts and logs (throttled) subscriber records refused
// past maxOwnerRecords (count of them, from node).
func (n *Node) refuseRecords(topic, node string, count int) {
	n.stats.refused.Add(uint64(count))
	if ok, suppressed := n.log.limit.allow("refused/records"); ok {
		n.log.Warn("subscription refused: subscriber records over the owner's bound", "topic", topic, "node", node,
			"refused", count, "records", n.owner.records.Load(), "limit", n.owner.maxRecords.Load(), "suppressed", suppressed)
	}
}

// recordsRefusal is the reason a subscriber refused past maxOwnerRecords
// is told.
func (n *Node) recordsRefusal() string {
	return fmt.Sprintf("it holds %d subscriber records, its bound (%d): unsubscribe what is not used, or add nodes to share the topics", n.owner.records.Load(), n.owner.maxRecords.Load())
}

// maxActorQueue bounds the requests from other nodes waiting for one topic
// actor; past it they are refused (OVERLOADED, so publishers retry) and
// counted in Stats().RequestsRefused.
const maxActorQueue = 1 << 16

// maxActorQueueBytes bounds the packed bytes of publishes from other nodes
// waiting for one topic actor, in each of its two queues (AckDelivered
// requests, and the early-ack queue, early.go): 65 536 requests of up to a
// NATS message each would otherwise hold gigabytes. Past it a request is
// refused like any other.
const maxActorQueueBytes = 64 << 20

// onActor runs fn on topic's actor. With bounded, it refuses (reports false)
// when maxActorQueue items already wait. Work that reaches an actor
// collected meanwhile goes on to its successor.
func (o *ownerSide) onActor(topic string, bounded bool, fn func(*topicActor)) bool {
	return o.onActorOf(o.actor(topic), bounded, fn)
}

// onActorOf is onActor for an actor already looked up.
func (o *ownerSide) onActorOf(a *topicActor, bounded bool, fn func(*topicActor)) bool {
	topic := a.topic
	limit := 0
	if bounded {
		limit = maxActorQueue
	}
	return a.s.doUpTo(func() {
		if a.dead {
			o.onActor(topic, false, fn)
			return
		}
		a.used = time.Now()
		fn(a)
	}, limit)
}

// collectIdleActors forgets the actors of topics without subscribers that
// saw no request for idle: a topic anyone can name must not cost memory for
// good (forged publishes to random topics, for one).
func (o *ownerSide) collectIdleActors(idle time.Duration) {
	o.mu.Lock()
	actors := make([]*topicActor, 0, len(o.topics))
	for _, a := range o.topics {
		if a.count.Load() == 0 {
			actors = append(actors, a)
		}
	}
	o.mu.Unlock()
	for _, a := range actors {
		a.s.do(func() {
			if a.dead || len(a.nodes) > 0 || a.inflight > 0 || time.Since(a.used) < idle || o.registry.hasPending(a.topic) {
				return
			}
			o.mu.Lock()
			if o.topics[a.topic] == a {
				delete(o.topics, a.topic)
				a.dead = true
				o.seqFloor = max(o.seqFloor, a.seq)
				a.producers.forgetAll(o.n) // work reaching it now goes to its successor
			}
			o.mu.Unlock()
		})
	}
}

// forgetMarks gives the producer marks of every actor back to the node's
// budget as the node stops, each on its actor after the work queued there.
func (o *ownerSide) forgetMarks() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, a := range o.topics {
		a.s.doUpTo(func() { a.producers.forgetAll(o.n) }, 0)
	}
}

// onPublishRequest serves a remote publisher. The caller counted the
// request in owner.queued; it reports whether the request was queued on
// its actor, which then uncounts it (else the caller does).
func (n *Node) onPublishRequest(req *wire.PublishRequest, reply string) (queued bool) {
	topic := req.GetTopic()
	if validateTopic(topic) != nil {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid topic"})
		return false
	}
	if v := n.view(); v.ownerOf(topic).ID != n.self.ID {
		if reply == "" {
			// Its count is counted as lost messages (AckNoneRefused):
			// believed only once the batch holds that many, or one forged
			// request counts billions.
			if _, err := receivedPayload(req.GetPacked(), req.GetPackedMeta(), req.GetCount()); err != nil {
				n.malformed("inbox", len(req.GetPacked())+len(req.GetPackedMeta()))
				return false
			}
		}
		n.answerPublish(topic, reply, int(req.GetCount()), &wire.Reply{Code: wire.Reply_NOT_OWNER, ViewId: v.id})
		return false
	}
	if len(req.GetProducer()) > maxProducerIDLen {
		n.malformed("inbox", len(req.GetPacked())+len(req.GetPackedMeta())+len(req.GetProducer()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "producer ID too long"})
		return false
	}
	msgs, err := receivedPayload(req.GetPacked(), req.GetPackedMeta(), req.GetCount())
	if err != nil {
		n.malformed("inbox", len(req.GetPacked())+len(req.GetPackedMeta()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: err.Error()})
		return false
	}
	if v := n.view(); !v.has(req.GetFrom()) && !n.stillDraining(req.GetFrom().GetNodeId(), req.GetFrom().GetIncarnation()) {
		// A publisher this node has not heard (as a subscribe from one is
		// refused): its node's subscribers, and maybe others', are missing
		// here. A node that joined behind a one-way stall owns everything
		// alone, and at the heal the held requests of the peers that route
		// to it arrive with their heartbeats: served at once, they reached
		// its own subscribers only, with no failure listed. The publisher
		// retries once this node has taken it (and their syncs) in. A
		// member that left gracefully is still served: its Close sends
		// its LEAVE first, then flushes its producers and outboxes.
		n.answerPublish(topic, reply, int(req.GetCount()), &wire.Reply{Code: wire.Reply_NOT_READY, ViewId: v.id})
		return false
	}
	msgs.wantIDs, msgs.publisher = req.GetDeliveredIds(), req.GetFrom().GetNodeId()
	if id := req.GetKeptCopy(); id != 0 {
		msgs.kept = keptRef{ids: []uint64{id}, inc: req.GetFrom().GetIncarnation()}
	}
	if msgs.wantIDs { // only a chunk of a split batch skips anyone
		msgs.skip = req.GetSkip()
	}
	msgs.level = AckLevel(min(req.GetAckLevel(), uint32(AckNone)))
	if ms := req.GetAnswerWithinMs(); ms > 0 {
		msgs.answerBy = time.Now().Add(time.Duration(ms) * time.Millisecond)
	}
	msgs.origin = batchOrigin{producer: req.GetProducer(), seq: req.GetProducerSeq(), prev: req.GetProducerPrev(), settled: req.GetProducerSettled(),
		split: splitChunk{id: req.GetSplitId(), index: req.GetSplitChunk()}}
	if msgs.level != AckDelivered {
		if !n.publishEarly(topic, msgs, reply) {
			n.refuse(topic, reply, msgs.count)
			return false
		}
		return true
	}
	if queued, ok := n.publishBehindEarly(topic, msgs, reply); queued {
		if !ok {
			n.refuse(topic, reply, msgs.count)
		}
		return ok
	}
	held, size := n.owner.actor(topic), int64(len(msgs.packed))
	if held.queuedBytes.Add(size) > maxActorQueueBytes {
		held.queuedBytes.Add(-size)
		n.refuse(topic, reply, msgs.count)
		return false
	}
	if !n.owner.onActorOf(held, true, func(a *topicActor) {
		held.queuedBytes.Add(-size) // held, not a: a successor may run this
		a.publish(msgs, func(ans ownerAnswer) { n.replyTo(reply, ans.wire()) })
		n.owner.queued.Add(-1)
	}) {
		held.queuedBytes.Add(-size)
		n.refuse(topic, reply, msgs.count)
		return false
	}
	return true
}

// refuse answers a request of count messages its topic actor had no room
// for.
func (n *Node) refuse(topic, reply string, count int) {
	n.countQueueFull(topic)
	n.answerPublish(topic, reply, count, &wire.Reply{Code: wire.Reply_OVERLOADED, ViewId: n.view().id,
		Error: fmt.Sprintf("its queue for the topic is full (%d requests or %d bytes): the owner is overloaded", maxActorQueue, maxActorQueueBytes)})
}

// countQueueFull counts and logs a request, from another node or this one,
// that its topic actor had no room for.
func (n *Node) countQueueFull(topic string) {
	n.stats.refused.Add(1)
	if ok, held := n.log.limit.allow("refused"); ok {
		n.log.Warn("request refused: topic actor queue full", "topic", topic, "limit", maxActorQueue, "limit_bytes", maxActorQueueBytes, "suppressed", held)
	}
}

// answerPublish answers a publish request of count messages. A request
// without a reply subject (AckNone) that is refused is lost, and its
// publisher never hears of it: counted (Stats.AckNoneRefused) and logged.
func (n *Node) answerPublish(topic, reply string, count int, rep *wire.Reply) {
	if reply != "" {
		n.replyTo(reply, rep)
		return
	}
	n.ackNoneAnswered(topic, count, rep.GetCode())
}

// ackNoneAnswered takes the topic actor's answer to an AckNone publish of
// count messages, from another node or this one: nobody waits for it, so a
// refusal (not the owner, not ready, held back for a producer's order) is
// counted (Stats.AckNoneRefused) and logged, as its messages are lost.
func (n *Node) ackNoneAnswered(topic string, count int, code wire.Reply_Code) {
	if code == wire.Reply_OK {
		return
	}
	n.stats.ackNoneRefused.Add(uint64(count))
	if ok, held := n.log.limit.allow("acknone/refused"); ok {
		n.log.Warn("AckNone publish refused as owner: its messages are lost", "topic", topic, "messages", count, "code", code, "suppressed", held)
	}
}

// stillDraining reports whether incarnation inc of id left gracefully
// within MemberTimeout (its LEAVE, which it repeats while it drains): its
// publishes are served and its answers waited for.
func (n *Node) stillDraining(id string, inc uint64) bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.members.buried(id, inc, n.cfg.MemberTimeout)
}

// onSubscribeRequest serves a remote subscriber's node.
func (n *Node) onSubscribeRequest(req *wire.SubscribeRequest, reply string) {
	topic := req.GetTopic()
	if validateTopic(topic) != nil || (req.GetSubscriber() == "" && !req.GetStats()) || req.GetFrom() == nil {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid subscribe"})
		return
	}
	if len(req.GetSubscriber()) > maxLocalIDLen {
		n.malformed("inbox", len(req.GetSubscriber()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "subscriber ID too long"})
		return
	}
	if v := n.view(); v.ownerOf(topic).ID != n.self.ID {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_OWNER, ViewId: v.id})
		return
	}
	answer := func(ans ownerAnswer) { n.replyTo(reply, ans.wire()) }
	if !n.owner.onActor(topic, true, func(a *topicActor) {
		if req.GetStats() {
			a.stats(answer)
			return
		}
		a.subscribe(req.GetFrom(), req.GetSubscriber(), req.GetUnsubscribe(), answer)
	}) {
		n.refuse(topic, reply, 0)
	}
}

// emitAccepted reports an answered batch: one PublishAccepted, one
// DeliverySucceeded, and one DeliveryFailed per failed subscriber.
func (n *Node) emitAccepted(ack PublishAck) {
	if !n.events.enabled() {
		return
	}
	emit(n.events, PublishAccepted{Topic: ack.Topic, Messages: ack.Messages, Delivered: ack.Delivered, Failed: len(ack.Failures)})
	if ack.Delivered > 0 {
		emit(n.events, DeliverySucceeded{Topic: ack.Topic, Subscribers: ack.Delivered, Messages: ack.Messages})
	}
	for _, f := range ack.Failures {
		emit(n.events, DeliveryFailed{Topic: ack.Topic, Subscriber: f.Subscriber, Group: f.Group, Status: f.Status, Messages: ack.Messages})
	}
}

// refreshTopics makes every actor reconcile with the current view, creating
// actors for topics whose subscribers arrived by sync.
func (n *Node) refreshTopics() {
	for _, t := range n.owner.registry.topicsPending() {
		n.owner.actor(t)
	}
	for _, t := range n.owner.names() {
		// Through onActor: an actor collected meanwhile must not take the
		// topic's synced subscribers with it.
		n.owner.onActor(t, false, func(a *topicActor) { a.reconcile() })
	}
}
