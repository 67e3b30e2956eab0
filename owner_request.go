package pubsub

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// ownerRequest is one kind of request to a topic's owner: how it travels to a
// remote owner, and what it does on this node's own actor when this node is
// the owner. Adding a request kind is one type here and one case in the
// owner's inbox dispatch.
type ownerRequest interface {
	// encode appends the request's envelope for view v to buf.
	encode(v *view, to uint64, buf []byte) []byte
	// runLocal runs the request on the topic's actor, answering once.
	runLocal(a *topicActor, answer func(ownerAnswer))
}

// ownerCall holds the per-call options of toOwner.
type ownerCall struct {
	wait  time.Duration // bounds one attempt; RequestTimeout when zero
	probe bool          // an unanswered attempt is retried, not a timeout
	// issued, if not nil, is called once, when the first attempt is queued
	// on the local actor or written to the connection.
	issued func()
	// attempt, if not nil, runs before each attempt; the func it returns
	// runs once that attempt is queued or written (or failed before).
	attempt func() func()
	// noAnswer (AckNone): the call returns once the request is queued on
	// the local actor or written to the connection, with an Accepted ack
	// that attests nothing more.
	noAnswer bool
}

// toOwner routes one request to the topic's owner: by function call when the
// owner is this node, over its inbox otherwise. It follows ownership changes,
// retrying "not owner", "not ready", "overloaded", a closing owner and NATS's
// no-responders until RequestTimeout, then fails with ErrTopicUnavailable,
// or ErrQueueFull when the last answer was "overloaded" (also when ctx ends
// first while it retries: nothing was published). A remote attempt
// that times out fails with ErrTimeout (the outcome is unknown, so it is not
// retried), unless the request is a probe.
func (n *Node) toOwner(ctx context.Context, topic string, req ownerRequest, o ownerCall) (ownerAnswer, error) {
	if o.wait == 0 {
		o.wait = n.cfg.RequestTimeout
	}
	var attemptIssued func()
	signal := func() {
		if attemptIssued != nil {
			attemptIssued()
			attemptIssued = nil
		}
		if o.issued != nil {
			o.issued()
			o.issued = nil
		}
	}
	start := time.Now()
	deadline := start.Add(n.cfg.RequestTimeout)
	backoff := time.Millisecond
	last := "no attempt"
	// overloaded: the last refusal said the owner had no room
	// (OVERLOADED): the call then fails with ErrQueueFull, as when this
	// node's own actor is full, not ErrTopicUnavailable.
	overloaded := false
	for {
		if n.life.closed.Load() {
			return ownerAnswer{}, ErrClosed
		}
		v := n.view()
		owner := v.ownerOf(topic)
		if o.attempt != nil {
			attemptIssued = o.attempt()
		}
		var ans ownerAnswer
		var err error
		switch owner.ID {
		case "":
			err = errNoOwner // waited for like an owner not ready: one may join
		case n.self.ID:
			if reason := n.notServingReason(); reason != "" && !o.noAnswer && refusedWhenNotServing(req) {
				// The actor would answer NOT_READY: refused here, the
				// attempt never waits behind its queue, so a ctx ending
				// meanwhile cannot leave the outcome unknown.
				ans = ownerAnswer{code: wire.Reply_NOT_READY, reason: reason}
				break
			}
			ans, err = n.askLocal(ctx, topic, req, signal, o.noAnswer)
		default:
			if o.noAnswer {
				ans, err = n.tellRemote(v, owner, req, signal)
			} else {
				ans, err = n.askRemote(ctx, topic, v, owner, req, o.wait, signal)
			}
		}
		if attemptIssued != nil { // the attempt failed before it was issued
			attemptIssued()
			attemptIssued = nil
		}
		overloaded = err == nil && ans.code == wire.Reply_OVERLOADED
		switch {
		case err == nil && ans.code == wire.Reply_OK:
			return ans, nil
		case err == nil && ans.code == wire.Reply_BAD_REQUEST:
			// The owner refused it before acting on it: nothing happened
			// there. Only a member built from another version of this
			// package (or a bug) sends what the owner cannot read.
			return ans, fmt.Errorf("%w: owner %s refused the request as malformed (is every member running the same version of this package?)", ErrTopicUnavailable, owner.ID)
		case err == nil && ans.code == wire.Reply_ORDER_WAIT:
			// Waiting for the producer's previous batch to settle can take
			// as long as that batch's delivery.
			last = fmt.Sprintf("owner %s holds the batch until the producer's previous one settles", owner.ID)
			deadline = start.Add(max(n.cfg.RequestTimeout, o.wait))
		case err == nil && ans.reason != "":
			last = fmt.Sprintf("owner %s answered %s: %s", owner.ID, ans.code, ans.reason)
		case err == nil:
			last = fmt.Sprintf("owner %s answered %s", owner.ID, ans.code)
		case err == errNoOwner:
			last = "no member may own topics (every member of the view is client-only)"
		case natsutil.IsNoResponders(err):
			last = fmt.Sprintf("owner %s unreachable", owner.ID)
		case errors.Is(err, nats.ErrReconnectBufExceeded):
			// Nothing was sent: the connection, reconnecting, holds no
			// more (nats.ReconnectBufSize). Retried like no responders,
			// so a move between servers costs a wait, not an unknown
			// outcome.
			last = "this node's NATS connection is reconnecting and its reconnect buffer is full"
		case errors.Is(err, ErrClosed) && n.life.closed.Load():
			return ans, err
		case errors.Is(err, ErrTimeout) && o.probe:
			last = fmt.Sprintf("owner %s did not answer", owner.ID)
		case errors.Is(err, errClosedInFlight) && !isPublish(req):
			// Only a publish's outcome is unknown when its node closes
			// under it; a subscription or a query of a closed node is
			// gone whatever the owner did.
			return ans, fmt.Errorf("%w: the node closed while waiting for owner %s's answer", ErrClosed, owner.ID)
		default:
			return ans, err
		}
		refusal := ErrTopicUnavailable
		if overloaded {
			refusal = ErrQueueFull
		}
		if time.Now().Add(backoff).After(deadline) {
			return ans, fmt.Errorf("%w: %s (after %v)", refusal, last, n.cfg.RequestTimeout)
		}
		if !n.pause(ctx, &backoff, 100*time.Millisecond) {
			if err := ctx.Err(); err != nil {
				// Every attempt so far was refused or reached no owner:
				// nothing was published, whichever deadline came first.
				// (Cancelled stays ReasonCancelled after "unavailable":
				// reasonOf looks for it before ErrTopicUnavailable; after
				// "overloaded" the reason is ReasonQueueFull, which it
				// looks for first. Either says nothing was published.)
				return ans, fmt.Errorf("%w: %s (the call's context ended first: %w)", refusal, last, err)
			}
			return ans, ErrClosed
		}
	}
}

// errNoOwner: every member of the view is client-only.
var errNoOwner = errors.New("pubsub: no owner-eligible member")

// askLocal runs a request on this node's actor for topic and waits for its
// answer; without answer, only until it is queued.
func (n *Node) askLocal(ctx context.Context, topic string, req ownerRequest, queued func(), noAnswer bool) (ownerAnswer, error) {
	if p, ok := req.(*publishRequest); ok && p.owned == nil && p.wire.GetAckLevel() != uint32(AckDelivered) {
		p.detach() // the actor reads it after this call returns
	}
	if noAnswer {
		// Nothing waits for the actor: its queue is bounded as for remote
		// requests, or a publishing loop would grow it without end. A
		// refusal is counted as one from another node is.
		answered := func(ownerAnswer) {}
		if p, ok := req.(*publishRequest); ok {
			answered = func(ans ownerAnswer) { n.ackNoneAnswered(topic, int(p.wire.GetCount()), ans.code) }
		}
		if !n.owner.onActor(topic, true, func(a *topicActor) { req.runLocal(a, answered) }) {
			return ownerAnswer{}, n.refusedLocally(topic)
		}
		queued()
		return ownerAnswer{code: wire.Reply_OK, ack: PublishAck{Topic: topic, Status: Accepted}}, nil
	}
	if err := ctx.Err(); err != nil {
		// Not queued: with the answer and ctx both ready below, select
		// would pick either, and a call with a dead ctx sometimes ran.
		return ownerAnswer{}, err
	}
	// Bounded too: a call whose ctx ends returns, but its request stays
	// queued until the actor runs it, so a loop of short-lived calls to a
	// stalled actor would otherwise queue without end.
	ch := make(chan ownerAnswer, 1)
	if !n.owner.onActor(topic, true, func(a *topicActor) { req.runLocal(a, func(ans ownerAnswer) { ch <- ans }) }) {
		return ownerAnswer{}, n.refusedLocally(topic)
	}
	queued()
	select {
	case ans := <-ch:
		return ans, nil
	case <-ctx.Done():
		return ownerAnswer{}, ctx.Err()
	case <-n.life.ctx.Done():
		return ownerAnswer{}, errClosedInFlight
	}
}

// refusedLocally counts and logs a request of this node's own that its
// topic's actor had no room for, and returns the error its call gets.
func (n *Node) refusedLocally(topic string) error {
	n.countQueueFull(topic)
	return fmt.Errorf("%w: the actor of topic %q on this node holds %d requests; wait for earlier calls to return, then retry", ErrQueueFull, topic, maxActorQueue)
}

// tellRemote writes a request to a remote owner without a reply subject:
// nothing comes back (AckNone).
func (n *Node) tellRemote(v *view, owner Member, req ownerRequest, written func()) (ownerAnswer, error) {
	buf := sendBufs.Get().(*[]byte)
	*buf = n.encodeRequest(v, owner, req, (*buf)[:0])
	err := n.nc.Publish(owner.Inbox, *buf)
	sendBufs.Put(buf) // the connection copied it
	if err != nil {
		return ownerAnswer{}, wrapSendErr(err)
	}
	written()
	return ownerAnswer{code: wire.Reply_OK, ack: PublishAck{Status: Accepted}}, nil
}

// askRemote sends a request to a remote owner and decodes its answer. It
// gives up early when the owner leaves the view.
func (n *Node) askRemote(ctx context.Context, topic string, v *view, owner Member, req ownerRequest, wait time.Duration, sent func()) (ownerAnswer, error) {
	buf := sendBufs.Get().(*[]byte)
	*buf = n.encodeRequest(v, owner, req, (*buf)[:0])
	rep, err := n.rpc.call(ctx, owner.Inbox, *buf, callOpts{timeout: wait, alive: n.ownerAnswers(owner), sent: sent})
	sendBufs.Put(buf)
	if err != nil {
		return ownerAnswer{}, err
	}
	ans := answerFromWire(topic, rep)
	n.answered(req, ans)
	return ans, nil
}

// holds returns a check that m, in its incarnation, is still in the view.
func (n *Node) holds(m Member) func() bool {
	return func() bool { return n.view().holds(m) }
}

// ownerAnswers returns a check that owner m may still answer a request it
// was sent: it is in the view, or it left gracefully and its LEAVE, which
// it repeats while it drains, was heard within MemberTimeout. A leaving
// owner sends its LEAVE first, then answers the requests it took before
// the drain began, so its publishers must not give up on them while it
// drains; once its LEAVEs stop (it died, or is gone) they do.
func (n *Node) ownerAnswers(m Member) func() bool {
	return func() bool {
		return n.view().holds(m) || n.stillDraining(m.ID, m.Incarnation)
	}
}

// publishRequest publishes one chunk of a batch.
type publishRequest struct {
	wire *wire.PublishRequest // the request, without its messages
	msgs msgBatch
	// origin numbers the chunk (a producer's batch, or the node's implicit
	// producer, renumbered per attempt); wantIDs asks for the delivered
	// subscribers.
	origin  *batchOrigin
	wantIDs bool
	owned   *ownedCopy // set by detach: the local owner reads this instead of msgs
	// run, instead of msgs, holds messages packed by an outbox
	// (outbox.go), in a buffer it reuses once the request was written.
	run []byte
	// wait and deadline bound how long the publisher waits for the answer
	// (its per-attempt wait, its call's deadline): sent as answer_within.
	wait     time.Duration
	deadline time.Time
}

// answerWithin is how long from now the publisher waits for the answer; 0
// when it does not say (a probe, AckNone).
func (r *publishRequest) answerWithin() time.Duration {
	d := r.wait
	if !r.deadline.IsZero() {
		d = min(d, time.Until(r.deadline))
	}
	return max(d, 0)
}

func (r *publishRequest) encode(v *view, to uint64, buf []byte) []byte {
	r.origin.refresh()
	r.wire.ToIncarnation = to
	r.wire.ViewId, r.wire.Producer, r.wire.ProducerSeq = v.id, r.origin.producer, r.origin.seq
	r.wire.ProducerPrev, r.wire.ProducerSettled = r.origin.prev, r.origin.settled
	r.wire.SplitId, r.wire.SplitChunk = r.origin.split.id, r.origin.split.index
	r.wire.AnswerWithinMs = uint32(min(r.answerWithin().Milliseconds(), math.MaxUint32))
	if r.run != nil {
		return wire.AppendPublishPacked(buf, r.wire, r.run) // packed already: an outbox's run
	}
	// The messages are packed straight into the request: one copy.
	return wire.AppendPublish(buf, r.wire, r.msgs.data, r.msgs.meta)
}

// packedIn returns the packed messages at the end of out, r's encoding,
// and whether they are in format 2.
func (r *publishRequest) packedIn(out []byte) ([]byte, bool) {
	size := len(r.run)
	withMeta := r.run == nil && r.msgs.meta != nil
	switch {
	case r.run != nil:
	case withMeta:
		size = wire.PackedMetaSize(r.msgs.data, r.msgs.meta)
	default:
		size = wire.PackedSize(r.msgs.data)
	}
	return out[len(out)-size:], withMeta
}

func (r *publishRequest) runLocal(a *topicActor, answer func(ownerAnswer)) {
	r.origin.refresh()
	p := payload{msgs: r.msgs, publisher: r.wire.GetFrom().GetNodeId(), origin: *r.origin, wantIDs: r.wantIDs,
		level: AckLevel(min(r.wire.GetAckLevel(), uint32(AckNone))), skip: r.wire.GetSkip()}
	if r.wait > 0 {
		p.answerBy = time.Now().Add(r.answerWithin())
	}
	if r.owned != nil {
		p.msgs, p.packed, p.withMeta, p.count = msgBatch{}, r.owned.packed, r.owned.withMeta, int(r.wire.GetCount())
	}
	a.publish(p, answer)
}

// ownedCopy is a batch packed into a buffer of the node's own.
type ownedCopy struct {
	packed   []byte
	withMeta bool
}

// detach packs the batch into a buffer of its own, for a local owner that
// reads it after the call returned (AckAccepted, AckNone): the caller's
// slices, and a producer's recycled batch, may change by then.
func (r *publishRequest) detach() {
	if r.run != nil {
		r.owned = &ownedCopy{packed: slices.Clone(r.run)}
		return
	}
	p := payload{msgs: r.msgs}
	packed, withMeta := p.wire()
	r.owned = &ownedCopy{packed: packed, withMeta: withMeta}
}

// subscribeRequest records, removes, or (stats) counts subscribers.
type subscribeRequest struct{ wire *wire.SubscribeRequest }

func (r subscribeRequest) encode(v *view, to uint64, buf []byte) []byte {
	r.wire.ViewId, r.wire.ToIncarnation = v.id, to
	return appendEnvelope(buf, &wire.Envelope{Body: &wire.Envelope_Subscribe{Subscribe: r.wire}})
}

func (r subscribeRequest) runLocal(a *topicActor, answer func(ownerAnswer)) {
	if r.wire.GetStats() {
		a.stats(answer)
		return
	}
	a.subscribe(r.wire.GetFrom(), r.wire.GetSubscriber(), r.wire.GetUnsubscribe(), answer)
}

// readinessProbe asks whether the owner serves the topic, delivering
// nothing: an empty publish (Initialize).
type readinessProbe struct {
	from  *wire.MemberRef
	topic string
}

func (r readinessProbe) encode(v *view, to uint64, buf []byte) []byte {
	return appendEnvelope(buf, &wire.Envelope{Body: &wire.Envelope_Publish{Publish: &wire.PublishRequest{From: r.from, ViewId: v.id, Topic: r.topic, ToIncarnation: to}}})
}

func (r readinessProbe) runLocal(a *topicActor, answer func(ownerAnswer)) {
	v, code := a.check()
	answer(ownerAnswer{code: code, viewID: v.id})
}

// refusedWhenNotServing reports whether the actor refuses req outright
// while the node does not serve its topics (topicActor.check): a publish
// or a readiness probe; a subscription is recorded all the same.
func refusedWhenNotServing(req ownerRequest) bool {
	switch req.(type) {
	case *publishRequest, readinessProbe:
		return true
	}
	return false
}

// isPublish reports whether req publishes messages.
func isPublish(req ownerRequest) bool {
	_, ok := req.(*publishRequest)
	return ok
}
