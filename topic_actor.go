package pubsub

import (
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// topicActor is the owner side of one topic: the subscriber set grouped by
// node, batch fan-out, and eviction. Its fields below s are touched only by
// work running on s.
type topicActor struct {
	n     *Node
	topic string
	s     serial

	epoch  uint64 // view epoch the state was reconciled to; noEpoch when fresh
	synced uint64 // view epoch whose syncs were merged; noEpoch when none
	owned  bool   // this node owns the topic in view epoch
	ready  bool   // the subscriber set is complete for epoch
	seq    uint64 // the last batch's number; starts at the creation time
	nodes  map[string]*nodeSubscribers
	// inflight counts accepted batches not yet accounted; used marks the
	// last request. An idle actor without subscribers is collected.
	inflight int
	used     time.Time
	dead     bool                 // collected: work that still reaches it goes to its successor
	fails    map[SubscriberID]int // consecutive failures, for eviction
	count    atomic.Int64         // subscribers, readable by Stats without the actor
}

const noEpoch = ^uint64(0)

// nodeSubscribers is one node's subscribers of one topic.
type nodeSubscribers struct {
	inc  uint64 // the node's incarnation
	set  map[string]struct{}
	list []string // sorted cache of set; nil when stale
}

func (ns *nodeSubscribers) locals() []string {
	if ns.list == nil {
		ns.list = make([]string, 0, len(ns.set))
		for l := range ns.set {
			ns.list = append(ns.list, l)
		}
		slices.Sort(ns.list)
	}
	return ns.list
}

// ownerAnswer is an owner's answer to a subscribe or publish, local or remote.
type ownerAnswer struct {
	code   wire.Reply_Code
	viewID uint64
	ack    PublishAck
	owner  string         // stats answers
	counts map[string]int // stats answers: subscribers per node
	// delivered lists the delivered subscribers, when the publish asked
	// (a chunk of a split batch).
	delivered []SubscriberID
}

// actor returns the topic's actor, creating it.
func (n *Node) actor(topic string) *topicActor {
	n.topicsMu.Lock()
	defer n.topicsMu.Unlock()
	a := n.topics[topic]
	if a == nil {
		// Batch numbers start above those of every collected actor (and at
		// the creation time, for other incarnations' sake), so an actor made
		// again numbers its batches above the old one's: subscribers drop
		// batches numbered below the last they saw.
		now := time.Now()
		seq := max(uint64(now.UnixNano()), n.seqFloor)
		a = &topicActor{n: n, topic: topic, epoch: noEpoch, synced: noEpoch, seq: seq, used: now}
		a.s.goroutines = &n.goroutines
		n.topics[topic] = a
	}
	return a
}

// maxActorQueue bounds the requests from other nodes waiting for one topic
// actor; past it they are refused (NOT_READY, so publishers retry) and
// counted in Stats().RequestsRefused.
const maxActorQueue = 1 << 16

// onActor runs fn on topic's actor. With bounded, it refuses (reports false)
// when maxActorQueue items already wait. Work that reaches an actor
// collected meanwhile goes on to its successor.
func (n *Node) onActor(topic string, bounded bool, fn func(*topicActor)) bool {
	a := n.actor(topic)
	limit := 0
	if bounded {
		limit = maxActorQueue
	}
	return a.s.doUpTo(func() {
		if a.dead {
			n.onActor(topic, false, fn)
			return
		}
		a.used = time.Now()
		fn(a)
	}, limit)
}

// collectIdleActors forgets the actors of topics without subscribers that
// saw no request for idle: a topic anyone can name must not cost memory for
// good (forged publishes to random topics, for one).
func (n *Node) collectIdleActors(idle time.Duration) {
	n.topicsMu.Lock()
	actors := make([]*topicActor, 0, len(n.topics))
	for _, a := range n.topics {
		if a.count.Load() == 0 {
			actors = append(actors, a)
		}
	}
	n.topicsMu.Unlock()
	for _, a := range actors {
		a.s.do(func() {
			if a.dead || len(a.nodes) > 0 || a.inflight > 0 || time.Since(a.used) < idle || n.registry.hasPending(a.topic) {
				return
			}
			n.topicsMu.Lock()
			if n.topics[a.topic] == a {
				delete(n.topics, a.topic)
				a.dead = true
				n.seqFloor = max(n.seqFloor, a.seq)
			}
			n.topicsMu.Unlock()
		})
	}
}

// reconcile brings the actor's state to the node's current view: it keeps
// serving a topic it owned throughout, drops subscribers of departed nodes,
// and rebuilds a topic it gained from the members' syncs.
func (a *topicActor) reconcile() *view {
	n := a.n
	v := n.view()
	if a.epoch != v.epoch {
		owned := v.ownerOf(a.topic).ID == n.id
		if n.events.enabled() {
			// Report a move this node takes part in: it owned the topic in
			// the previous view and not now, or the other way round.
			if prev := n.viewAt(v.epoch - 1); prev != nil {
				was := prev.ownerOf(a.topic).ID
				if (was == n.id) != owned {
					emit(n.events, TopicOwnerChanged{Topic: a.topic, OldOwner: was, NewOwner: v.ownerOf(a.topic).ID})
				}
			}
		}
		keep := owned && a.owned && a.ready && n.ownedThroughout(a.topic, a.epoch, v.epoch)
		if keep {
			for id, ns := range a.nodes {
				if m, ok := v.member(id); !ok || m.Incarnation != ns.inc {
					a.dropNode(id)
				}
			}
		} else {
			if a.owned && !owned {
				n.log.Debug("topic moved away", "topic", a.topic, "owner", v.ownerOf(a.topic).ID)
			}
			a.nodes, a.fails, a.ready = nil, nil, false
			a.count.Store(0)
		}
		a.owned, a.epoch = owned, v.epoch
	}
	// Every member's sync for this view is merged once it is complete, also
	// into a topic kept from the previous view: a member that was dropped
	// (a false suspicion) and is back re-registers its subscribers this way.
	if a.owned && a.synced != v.epoch {
		if subs, ok := n.registry.take(a.topic, v.epoch); ok {
			for node, locals := range subs {
				m, _ := v.member(node)
				for _, l := range locals {
					a.add(node, m.Incarnation, l)
				}
			}
			a.ready, a.synced = true, v.epoch
		}
	}
	return v
}

func (a *topicActor) add(node string, inc uint64, local string) bool {
	if a.nodes == nil {
		a.nodes = make(map[string]*nodeSubscribers)
	}
	ns := a.nodes[node]
	if ns != nil && ns.inc != inc {
		a.dropNode(node) // subscribers of the node's previous life are gone
		ns = nil
	}
	if ns == nil {
		ns = &nodeSubscribers{inc: inc, set: make(map[string]struct{}, 1)}
		a.nodes[node] = ns
	}
	if _, ok := ns.set[local]; ok {
		return false
	}
	ns.set[local] = struct{}{}
	ns.list = nil
	a.count.Add(1)
	return true
}

func (a *topicActor) remove(id SubscriberID) bool {
	ns := a.nodes[id.Node]
	if ns == nil {
		return false
	}
	if _, ok := ns.set[id.Local]; !ok {
		return false
	}
	delete(ns.set, id.Local)
	ns.list = nil
	a.count.Add(-1)
	if len(ns.set) == 0 {
		delete(a.nodes, id.Node)
	}
	delete(a.fails, id)
	return true
}

func (a *topicActor) dropNode(node string) {
	for l := range a.nodes[node].set {
		id := SubscriberID{Node: node, Local: l}
		delete(a.fails, id)
		emit(a.n.events, SubscriberRemoved{Topic: a.topic, Subscriber: id})
	}
	a.count.Add(-int64(len(a.nodes[node].set)))
	delete(a.nodes, node)
}

// check answers whether the actor can serve a request now.
func (a *topicActor) check() (*view, wire.Reply_Code) {
	v := a.reconcile()
	switch {
	case !a.owned:
		return v, wire.Reply_NOT_OWNER
	case !a.ready || !a.n.joined.Load() || !a.n.servesAsOwner():
		// Until Join has a stable view, this node's view may lack members
		// whose subscriptions it would then never ask for. Under
		// KeepMajority a node cut off from the majority serves nothing.
		return v, wire.Reply_NOT_READY
	}
	return v, wire.Reply_OK
}

// subscribe records (or removes) one subscriber. A topic gained but not yet
// ready still records it: the record is part of the state it will serve.
func (a *topicActor) subscribe(from *wire.MemberRef, local string, unsubscribe bool, answer func(ownerAnswer)) {
	v, code := a.check()
	if code == wire.Reply_NOT_OWNER || !v.has(from) {
		if code == wire.Reply_OK {
			code = wire.Reply_NOT_READY // we have not seen the sender join yet
		}
		answer(ownerAnswer{code: code, viewID: v.id})
		return
	}
	id := SubscriberID{Node: from.GetNodeId(), Local: local}
	if unsubscribe {
		if a.remove(id) {
			emit(a.n.events, SubscriberRemoved{Topic: a.topic, Subscriber: id})
		}
	} else if a.add(id.Node, from.GetIncarnation(), id.Local) {
		emit(a.n.events, SubscriberAdded{Topic: a.topic, Subscriber: id})
	}
	answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id})
}

// publish fans an accepted batch out: one delivery per node, the local one by
// function call, and answers once every node reported or timed out.
//
// A batch that arrived over NATS stays packed: remote nodes get it as is,
// so it is never re-encoded message by message.
func (a *topicActor) publish(msgs payload, answer func(ownerAnswer)) {
	v, code := a.check()
	if code != wire.Reply_OK {
		answer(ownerAnswer{code: code, viewID: v.id})
		return
	}
	n := a.n
	if msgs.len() == 0 { // a readiness probe (Initialize)
		answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id, ack: PublishAck{Topic: a.topic, Status: Accepted}})
		return
	}
	a.seq++
	msgs.seq = batchSeq{owner: n.id, inc: n.incarnation, seq: a.seq}
	b := &pendingBatch{a: a, answer: answer, remaining: len(a.nodes), wantIDs: msgs.wantIDs}
	b.ack = PublishAck{Topic: a.topic, Status: Accepted, Messages: msgs.len()}
	n.stats.published.Add(uint64(msgs.len()))
	if len(a.nodes) == 0 {
		n.emitAccepted(b.ack)
		answer(ownerAnswer{code: wire.Reply_OK, viewID: v.id, ack: b.ack})
		return
	}
	a.inflight++    // until account runs for b
	var head []byte // the encoded batch fields all remote nodes share, but the messages
	atLeastOnce := n.cfg.DeliveryMode(a.topic) == AtLeastOnce
	for node, ns := range a.nodes {
		locals := ns.locals()
		if node == n.id {
			n.deliver(a.topic, locals, msgs, func(st []DeliveryStatus) { b.report(node, locals, st, false) })
			continue
		}
		m, ok := v.member(node)
		if !ok {
			b.report(node, locals, fill(len(locals), SubscriberGone), false)
			continue
		}
		if head == nil {
			head, _ = proto.Marshal(&wire.DeliverBatch{Owner: n.selfRef(), Topic: a.topic, Seq: a.seq,
				Count: uint32(msgs.len()), AtLeastOnce: atLeastOnce, Producer: msgs.origin.producer, ProducerSeq: msgs.origin.seq})
		}
		// Protobuf merges repeated occurrences of an embedded message, so the
		// per-node subscriber list is appended to the shared encoding instead
		// of re-encoding the messages for every node. A list too long to fit
		// beside the batch goes in several messages, each reported apart.
		packed := msgs.wire()
		parts := splitSubscribers(locals, n.maxPayload()-len(head)-len(packed)-16)
		b.addParts(len(parts) - 1)
		for _, part := range parts {
			suffix, _ := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{Subscribers: part}}})
			n.deliverRemote(b, m, remoteBatch{head, packed, suffix}, part, atLeastOnce, time.Now().Add(n.cfg.SubscriberTimeout))
		}
	}
}

// splitSubscribers cuts a node's subscriber list into runs whose encoding
// fits in room bytes (at least one subscriber per run).
func splitSubscribers(locals []string, room int) [][]string {
	var parts [][]string
	start, size := 0, 16 // envelope and field headers
	for i, l := range locals {
		sz := len(l) + 3
		if i > start && size+sz > room {
			parts = append(parts, locals[start:i])
			start, size = i, 16
		}
		size += sz
	}
	return append(parts, locals[start:])
}

// deliverRemote sends one node its batch and reports the outcome to b. When
// NATS answers "no responders" (the node's inbox interest has not reached our
// server yet, or the node is reconnecting) nothing was delivered, so it
// retries while the node is in the view, until the subscriber timeout. In
// at-least-once mode it also re-sends when a copy got no report in a quarter
// of the subscriber timeout; the node delivers the batch once and answers
// every copy.
func (n *Node) deliverRemote(b *pendingBatch, m Member, data remoteBatch, locals []string, atLeastOnce bool, until time.Time) {
	timeout := n.cfg.SubscriberTimeout + n.cfg.RequestTimeout/2
	if atLeastOnce {
		timeout = max(n.cfg.SubscriberTimeout/4, 20*time.Millisecond)
	}
	alive := n.holds(m)
	buf := data.encode()
	tok := n.rpc.send(m.Inbox, *buf, timeout, func(rep *wire.Reply, err error) {
		retry := natsutil.IsNoResponders(err) || (atLeastOnce && errors.Is(err, ErrTimeout))
		if retry && n.ctx.Err() == nil && alive() {
			if natsutil.IsNoResponders(err) && time.Now().Before(until) {
				time.AfterFunc(10*time.Millisecond, func() { n.deliverRemote(b, m, data, locals, atLeastOnce, until) })
				return
			}
			// A copy may be in the node's mailboxes: keep asking until the
			// node's own subscriber timeout must have passed.
			if atLeastOnce && time.Now().Before(until.Add(n.cfg.RequestTimeout/2)) {
				n.deliverRemote(b, m, data, locals, atLeastOnce, until)
				return
			}
		}
		st, path := remoteStatuses(n, m.ID, len(locals), rep, err)
		b.report(m.ID, locals, st, path)
	})
	sendBufs.Put(buf) // the connection copied it
	// A node that leaves the view (crash) will not report: its subscribers
	// are gone, and the ack need not wait for the timeout.
	n.rpc.watch(tok, alive, n.cfg.HeartbeatInterval)
}

// remoteBatch is one node's DeliverBatch: the batch fields and messages
// shared by every node, then that node's subscriber list. It is assembled
// into a pooled buffer for each send, so the messages are copied once per
// node, straight into the buffer NATS copies from.
type remoteBatch struct{ head, packed, suffix []byte }

// sendBufs recycles the buffers remote batches are assembled in; NATS copies
// a message into its own write buffer before Publish returns.
var sendBufs = sync.Pool{New: func() any { return new([]byte) }}

func (r remoteBatch) encode() *[]byte {
	buf := sendBufs.Get().(*[]byte)
	*buf = append(wire.AppendDeliver((*buf)[:0], r.head, r.packed), r.suffix...)
	return buf
}

// remoteStatuses turns a node's delivery report (or its absence) into one
// status per subscriber. path is true when the node did not report: the
// network or the node failed, not its subscribers, so the failures are
// reported as Timeout (outcome unknown) but never count towards eviction.
func remoteStatuses(n *Node, node string, count int, rep *wire.Reply, err error) (st []DeliveryStatus, path bool) {
	if err == nil && rep.GetCode() == wire.Reply_OK && len(rep.GetStatuses()) == count {
		st := make([]DeliveryStatus, count)
		for i, s := range rep.GetStatuses() {
			st[i] = DeliveryStatus(s)
			if st[i] > OutOfOrder {
				st[i] = HandlerError
			}
		}
		return st, false
	}
	if _, ok := n.view().member(node); !ok || rep.GetCode() == wire.Reply_CLOSED {
		return fill(count, SubscriberGone), false
	}
	if ok, held := n.logLimit.allow("deliver/" + node); ok {
		n.log.Warn("delivery to node failed", "node", node, "err", err, "code", rep.GetCode(), "suppressed", held)
	}
	return fill(count, Timeout), true
}

func fill(n int, s DeliveryStatus) []DeliveryStatus {
	st := make([]DeliveryStatus, n)
	for i := range st {
		st[i] = s
	}
	return st
}

// pendingBatch collects the per-node reports of one accepted batch.
type pendingBatch struct {
	a         *topicActor
	answer    func(ownerAnswer)
	mu        sync.Mutex
	remaining int
	ack       PublishAck
	outcomes  []subscriberOutcome
	wantIDs   bool // list the delivered subscribers in the answer
	delivered []SubscriberID
}

type subscriberOutcome struct {
	id     SubscriberID
	status DeliveryStatus
	path   bool // no report from the node: not the subscriber's failure
}

// addParts counts extra reports to wait for (a node's list sent in parts).
func (b *pendingBatch) addParts(k int) {
	if k > 0 {
		b.mu.Lock()
		b.remaining += k
		b.mu.Unlock()
	}
}

func (b *pendingBatch) report(node string, locals []string, st []DeliveryStatus, path bool) {
	b.mu.Lock()
	for i, s := range st {
		id := SubscriberID{Node: node, Local: locals[i]}
		if s == Delivered {
			b.ack.Delivered++
			if b.wantIDs {
				b.delivered = append(b.delivered, id)
			}
		} else {
			b.ack.Failures = append(b.ack.Failures, DeliveryFailure{Subscriber: id, Status: s})
		}
		b.outcomes = append(b.outcomes, subscriberOutcome{id, s, path})
	}
	b.remaining--
	done := b.remaining == 0
	b.mu.Unlock()
	if !done {
		return
	}
	a := b.a
	a.n.stats.delivered.Add(uint64(b.ack.Delivered))
	a.n.stats.failed.Add(uint64(len(b.ack.Failures)))
	// Evictions are queued before the answer, so the publisher's next batch
	// is served without the subscribers this one evicted.
	a.s.do(func() {
		a.inflight--
		a.account(b.outcomes)
	})
	a.n.emitAccepted(b.ack)
	b.answer(ownerAnswer{code: wire.Reply_OK, viewID: a.n.view().id, ack: b.ack, delivered: b.delivered})
}

// account applies a batch's outcomes: a success resets a subscriber's
// failure count; SubscriberGone evicts at once; other failures the node
// reported evict after EvictAfter in a row.
func (a *topicActor) account(outcomes []subscriberOutcome) {
	for _, o := range outcomes {
		if o.status == Delivered {
			delete(a.fails, o.id)
			continue
		}
		if o.status == OutOfOrder || o.path {
			continue // the batch's or the network's fault, not the subscriber's
		}
		if ns := a.nodes[o.id.Node]; ns == nil {
			continue // already removed
		} else if _, ok := ns.set[o.id.Local]; !ok {
			continue
		}
		if o.status != SubscriberGone {
			if a.fails == nil {
				a.fails = make(map[SubscriberID]int)
			}
			a.fails[o.id]++
			if a.fails[o.id] < a.n.cfg.EvictAfter {
				continue
			}
		}
		a.remove(o.id)
		if o.status == SubscriberGone {
			// Its node no longer has it, or left the view. Nothing to tell:
			// a node wrongly suspected re-registers its live subscriptions
			// by sync when it reappears, and a notice would end them.
			a.n.stats.evicted.Add(1)
			emit(a.n.events, SubscriberEvicted{Topic: a.topic, Subscriber: o.id, Status: o.status})
			continue
		}
		a.n.notifyEvicted(a.topic, o.id, o.status)
		if o.id.Node != a.n.id { // a local subscriber's eviction is emitted once, by evictLocal
			emit(a.n.events, SubscriberEvicted{Topic: a.topic, Subscriber: o.id, Status: o.status})
		}
	}
}

// onPublishRequest serves a remote publisher.
func (n *Node) onPublishRequest(req *wire.PublishRequest, reply string) {
	topic := req.GetTopic()
	if validateTopic(topic) != nil {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid topic"})
		return
	}
	if v := n.view(); v.ownerOf(topic).ID != n.id {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_OWNER, ViewId: v.id})
		return
	}
	if err := wire.Validate(req.GetPacked(), req.GetCount()); err != nil {
		n.malformed("inbox", len(req.GetPacked()))
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: err.Error()})
		return
	}
	msgs := payload{packed: req.GetPacked(), count: int(req.GetCount()), wantIDs: req.GetDeliveredIds(),
		origin: batchOrigin{producer: req.GetProducer(), seq: req.GetProducerSeq()}}
	if !n.onActor(topic, true, func(a *topicActor) {
		a.publish(msgs, func(ans ownerAnswer) { n.replyTo(reply, ans.wire()) })
	}) {
		n.refuse(topic, reply)
	}
}

// refuse answers a request its topic actor had no room for.
func (n *Node) refuse(topic, reply string) {
	n.stats.refused.Add(1)
	if ok, held := n.logLimit.allow("refused"); ok {
		n.log.Warn("request refused: topic actor queue full", "topic", topic, "limit", maxActorQueue, "suppressed", held)
	}
	n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_READY, ViewId: n.view().id})
}

// onSubscribeRequest serves a remote subscriber's node.
func (n *Node) onSubscribeRequest(req *wire.SubscribeRequest, reply string) {
	topic := req.GetTopic()
	if validateTopic(topic) != nil || (req.GetSubscriber() == "" && !req.GetStats()) || req.GetFrom() == nil {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "invalid subscribe"})
		return
	}
	if v := n.view(); v.ownerOf(topic).ID != n.id {
		n.replyTo(reply, &wire.Reply{Code: wire.Reply_NOT_OWNER, ViewId: v.id})
		return
	}
	answer := func(ans ownerAnswer) { n.replyTo(reply, ans.wire()) }
	if !n.onActor(topic, true, func(a *topicActor) {
		if req.GetStats() {
			a.stats(answer)
			return
		}
		a.subscribe(req.GetFrom(), req.GetSubscriber(), req.GetUnsubscribe(), answer)
	}) {
		n.refuse(topic, reply)
	}
}

func (ans ownerAnswer) wire() *wire.Reply {
	rep := &wire.Reply{Code: ans.code, ViewId: ans.viewID, Owner: ans.owner}
	if ans.code == wire.Reply_OK {
		rep.Ack = ackToWire(ans.ack)
		for _, id := range ans.delivered {
			rep.Ack.DeliveredTo = append(rep.Ack.DeliveredTo, &wire.Failure{Node: id.Node, Local: id.Local})
		}
	}
	if ans.counts != nil {
		rep.Subscribers = make(map[string]uint32, len(ans.counts))
		for k, v := range ans.counts {
			rep.Subscribers[k] = uint32(v)
		}
	}
	return rep
}

// answerFromWire decodes a remote owner's answer.
func answerFromWire(topic string, rep *wire.Reply) ownerAnswer {
	ans := ownerAnswer{code: rep.GetCode(), viewID: rep.GetViewId(), owner: rep.GetOwner()}
	if rep.GetCode() == wire.Reply_OK {
		ans.ack = ackFromWire(topic, rep.GetAck())
		for _, f := range rep.GetAck().GetDeliveredTo() {
			ans.delivered = append(ans.delivered, SubscriberID{Node: f.GetNode(), Local: f.GetLocal()})
		}
	}
	if rep.GetSubscribers() != nil {
		ans.counts = make(map[string]int, len(rep.GetSubscribers()))
		for k, c := range rep.GetSubscribers() {
			ans.counts[k] = int(c)
		}
	}
	return ans
}

func ackToWire(a PublishAck) *wire.Ack {
	w := &wire.Ack{Status: uint32(a.Status), Reason: uint32(a.Reason), Messages: uint32(a.Messages), Delivered: uint32(a.Delivered)}
	for _, f := range a.Failures {
		w.Failures = append(w.Failures, &wire.Failure{Node: f.Subscriber.Node, Local: f.Subscriber.Local, Status: uint32(f.Status)})
	}
	return w
}

func ackFromWire(topic string, w *wire.Ack) PublishAck {
	a := PublishAck{Topic: topic, Status: AckStatus(w.GetStatus()), Reason: Reason(w.GetReason()),
		Messages: int(w.GetMessages()), Delivered: int(w.GetDelivered())}
	for _, f := range w.GetFailures() {
		a.Failures = append(a.Failures, DeliveryFailure{Subscriber: SubscriberID{Node: f.GetNode(), Local: f.GetLocal()}, Status: DeliveryStatus(f.GetStatus())})
	}
	return a
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
		emit(n.events, DeliveryFailed{Topic: ack.Topic, Subscriber: f.Subscriber, Status: f.Status, Messages: ack.Messages})
	}
}
