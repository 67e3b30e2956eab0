package pubsub

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// ownerRequest is one kind of request to a topic's owner: how it travels to a
// remote owner, and what it does on this node's own actor when this node is
// the owner. Adding a request kind is one type here and one case in the
// owner's inbox dispatch.
type ownerRequest interface {
	// encode appends the request's envelope for view v to buf.
	encode(v *view, buf []byte) []byte
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
}

// toOwner routes one request to the topic's owner: by function call when the
// owner is this node, over its inbox otherwise. It follows ownership changes,
// retrying "not owner", "not ready", a closing owner and NATS's no-responders
// until RequestTimeout, then fails with ErrTopicUnavailable. A remote attempt
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
	deadline := time.Now().Add(n.cfg.RequestTimeout)
	backoff := time.Millisecond
	last := "no attempt"
	for {
		if n.closed.Load() {
			return ownerAnswer{}, ErrClosed
		}
		v := n.view()
		owner := v.ownerOf(topic)
		if o.attempt != nil {
			attemptIssued = o.attempt()
		}
		var ans ownerAnswer
		var err error
		if owner.ID == n.id {
			ans, err = n.askLocal(ctx, topic, req, signal)
		} else {
			ans, err = n.askRemote(ctx, topic, v, owner, req, o.wait, signal)
		}
		if attemptIssued != nil { // the attempt failed before it was issued
			attemptIssued()
			attemptIssued = nil
		}
		switch {
		case err == nil && ans.code == wire.Reply_OK:
			return ans, nil
		case err == nil && ans.code == wire.Reply_BAD_REQUEST:
			return ans, fmt.Errorf("pubsub: owner %s refused the request as malformed", owner.ID)
		case err == nil:
			last = fmt.Sprintf("owner %s answered %s", owner.ID, ans.code)
		case natsutil.IsNoResponders(err):
			last = fmt.Sprintf("owner %s unreachable", owner.ID)
		case errors.Is(err, ErrClosed) && n.closed.Load():
			return ans, err
		case errors.Is(err, ErrTimeout) && o.probe:
			last = fmt.Sprintf("owner %s did not answer", owner.ID)
		default:
			return ans, err
		}
		if time.Now().Add(backoff).After(deadline) {
			return ans, fmt.Errorf("%w: %s (after %v)", ErrTopicUnavailable, last, n.cfg.RequestTimeout)
		}
		if !n.pause(ctx, &backoff, 100*time.Millisecond) {
			if ctx.Err() != nil {
				return ans, ctx.Err()
			}
			return ans, ErrClosed
		}
	}
}

// askLocal runs a request on this node's actor for topic and waits for its answer.
func (n *Node) askLocal(ctx context.Context, topic string, req ownerRequest, queued func()) (ownerAnswer, error) {
	ch := make(chan ownerAnswer, 1)
	n.onActor(topic, false, func(a *topicActor) { req.runLocal(a, func(ans ownerAnswer) { ch <- ans }) })
	queued()
	select {
	case ans := <-ch:
		return ans, nil
	case <-ctx.Done():
		return ownerAnswer{}, ctx.Err()
	case <-n.ctx.Done():
		return ownerAnswer{}, errClosedInFlight
	}
}

// askRemote sends a request to a remote owner and decodes its answer. It
// gives up early when the owner leaves the view.
func (n *Node) askRemote(ctx context.Context, topic string, v *view, owner Member, req ownerRequest, wait time.Duration, sent func()) (ownerAnswer, error) {
	buf := sendBufs.Get().(*[]byte)
	*buf = req.encode(v, (*buf)[:0])
	rep, err := n.rpc.call(ctx, owner.Inbox, *buf, callOpts{timeout: wait, alive: n.holds(owner), every: n.cfg.HeartbeatInterval, sent: sent})
	sendBufs.Put(buf)
	if err != nil {
		return ownerAnswer{}, err
	}
	return answerFromWire(topic, rep), nil
}

// holds returns a check that m, in its incarnation, is still in the view.
func (n *Node) holds(m Member) func() bool {
	return func() bool { return n.view().holds(m) }
}

// publishRequest publishes one chunk of a batch.
type publishRequest struct {
	wire *wire.PublishRequest // the request, without its messages
	msgs [][]byte
	// origin numbers the chunk (a producer's batch, or the node's implicit
	// producer, renumbered per attempt); wantIDs asks for the delivered
	// subscribers.
	origin  *batchOrigin
	wantIDs bool
}

func (r *publishRequest) encode(v *view, buf []byte) []byte {
	r.wire.ViewId, r.wire.Producer, r.wire.ProducerSeq = v.id, r.origin.producer, r.origin.seq
	// The messages are packed straight into the request: one copy.
	return wire.AppendPublish(buf, r.wire, r.msgs)
}

func (r *publishRequest) runLocal(a *topicActor, answer func(ownerAnswer)) {
	a.publish(payload{msgs: r.msgs, origin: *r.origin, wantIDs: r.wantIDs}, answer)
}

// subscribeRequest records, removes, or (stats) counts subscribers.
type subscribeRequest struct{ wire *wire.SubscribeRequest }

func (r subscribeRequest) encode(v *view, buf []byte) []byte {
	r.wire.ViewId = v.id
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

func (r readinessProbe) encode(v *view, buf []byte) []byte {
	return appendEnvelope(buf, &wire.Envelope{Body: &wire.Envelope_Publish{Publish: &wire.PublishRequest{From: r.from, ViewId: v.id, Topic: r.topic}}})
}

func (r readinessProbe) runLocal(a *topicActor, answer func(ownerAnswer)) {
	v, code := a.check()
	answer(ownerAnswer{code: code, viewID: v.id})
}
