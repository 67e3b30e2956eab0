package pubsub

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// rpc sends requests to node inboxes and routes the replies, through one
// wildcard reply subscription, to callbacks. Unlike nc.Request it needs no
// goroutine per outstanding request, so an owner can keep one delivery per
// node and batch in flight cheaply.
type rpc struct {
	nc     *nats.Conn
	prefix string // "<inbox>." ; reply subjects are prefix+token
	sub    *nats.Subscription

	mu      sync.Mutex
	next    uint64
	pending map[uint64]*call
	closed  bool

	sweepPending atomic.Bool // a sweep is scheduled

	laterMu    sync.Mutex
	laterUntil time.Time     // sweepUntil: sweep until then...
	laterStep  time.Duration // ...every step
	laterTimer *time.Timer   // nil: none scheduled; stopped by close
}

type call struct {
	cb    func(*wire.Reply, error)
	timer *time.Timer
	alive func() bool // see watch; nil when unwatched
}

var errNoResponders = nats.ErrNoResponders

// errClosedInFlight ends a request the node was still waiting for when it
// closed: the request may have been processed, so it is a timeout (outcome
// unknown), not a rejection.
var errClosedInFlight = fmt.Errorf("%w: the node closed while waiting for the answer; the outcome is unknown", ErrTimeout)

func newRPC(nc *nats.Conn) (*rpc, error) {
	r := &rpc{nc: nc, pending: make(map[uint64]*call)}
	r.prefix = nc.NewInbox() + "."
	sub, err := nc.Subscribe(r.prefix+"*", r.onReply)
	if err != nil {
		return nil, fmt.Errorf("pubsub: reply subscription: %w", err)
	}
	// Replies are about as many as the requests in flight, but anyone who
	// can publish to the prefix could send more: bounded as the inbox is,
	// a drop counted with the inbox's (Node.checkInboxDrops).
	if err := sub.SetPendingLimits(inboxPendingMsgs, inboxPendingBytes); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("pubsub: reply subscription: %w", err)
	}
	r.sub = sub
	return r, nil
}

// send publishes data to subject with a reply subject and calls cb exactly
// once: with the reply, or with an error (errNoResponders, ErrTimeout,
// ErrClosed, a publish error). cb must not block. It returns a token for
// abandon.
func (r *rpc) send(subject string, data []byte, timeout time.Duration, cb func(*wire.Reply, error)) uint64 {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		cb(nil, ErrClosed)
		return 0
	}
	r.next++
	tok := r.next
	c := &call{cb: cb}
	r.pending[tok] = c
	c.timer = time.AfterFunc(timeout, func() { r.finish(tok, nil, fmt.Errorf("%w: no reply from %s within %v", ErrTimeout, subject, timeout)) })
	r.mu.Unlock()
	if err := r.nc.PublishRequest(subject, r.prefix+strconv.FormatUint(tok, 36), data); err != nil {
		r.finish(tok, nil, wrapSendErr(err))
	}
	return tok
}

// wrapSendErr marks a send on a closed or draining connection as
// ErrClosed: nothing was sent, and nothing will be on that connection (the
// application drained it: nc.Drain).
func wrapSendErr(err error) error {
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrConnectionDraining) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}

// sendEnvelope is send for an envelope not yet encoded.
func (r *rpc) sendEnvelope(subject string, env *wire.Envelope, timeout time.Duration, cb func(*wire.Reply, error)) {
	data, err := proto.Marshal(env)
	if err != nil {
		cb(nil, err)
		return
	}
	r.send(subject, data, timeout, cb)
}

// watch makes pending call tok fail with ErrTimeout once alive turns false
// (its peer left the view: the request may or may not have been
// processed). The node sweeps the watched calls a heartbeat after each view
// change (no timer per call: an owner with a deep backlog of deliveries
// once spent a fifth of its CPU on them); alive is checked once now too.
func (r *rpc) watch(tok uint64, alive func() bool) {
	r.mu.Lock()
	if c, ok := r.pending[tok]; ok {
		c.alive = alive
	}
	r.mu.Unlock()
	if !alive() {
		r.finish(tok, nil, fmt.Errorf("%w: peer left the cluster", ErrTimeout))
	}
}

// sweepAfter sweeps once d from now; a burst of view changes (a flood of
// forged members) schedules one sweep, not one each.
func (r *rpc) sweepAfter(d time.Duration) {
	if r.sweepPending.CompareAndSwap(false, true) {
		time.AfterFunc(d, func() {
			r.sweepPending.Store(false)
			r.sweep()
		})
	}
}

// sweepUntil sweeps every step until until. A peer that left gracefully
// stays alive for its requests while its LEAVE repeats (ownerAnswers); if
// it dies while draining nothing else would sweep its calls before they
// time out. Each LEAVE heard extends one shared timer, so a call is swept
// within a step of its peer's grace running out, whichever peer it is.
func (r *rpc) sweepUntil(until time.Time, step time.Duration) {
	r.laterMu.Lock()
	defer r.laterMu.Unlock()
	if until.After(r.laterUntil) {
		r.laterUntil = until
	}
	r.laterStep = step
	if r.laterTimer == nil && !r.isClosed() {
		r.laterTimer = time.AfterFunc(step, r.sweepLater)
	}
}

func (r *rpc) sweepLater() {
	r.sweep()
	r.laterMu.Lock()
	defer r.laterMu.Unlock()
	if r.laterTimer == nil { // closed meanwhile
		return
	}
	if time.Now().Before(r.laterUntil) {
		r.laterTimer.Reset(r.laterStep)
		return
	}
	r.laterTimer = nil
}

func (r *rpc) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// sweep fails the watched calls whose peer is no longer alive. The checks
// run outside r.mu: they take other roles' locks (ownerAnswers takes
// members.mu), and r.mu is the hot lock every send and reply takes.
func (r *rpc) sweep() {
	type watched struct {
		tok   uint64
		alive func() bool
	}
	r.mu.Lock()
	var calls []watched
	for tok, c := range r.pending {
		if c.alive != nil {
			calls = append(calls, watched{tok, c.alive})
		}
	}
	r.mu.Unlock()
	var gone []uint64
	for _, c := range calls {
		if !c.alive() {
			gone = append(gone, c.tok)
		}
	}
	for _, tok := range gone { // a call answered meanwhile is no longer pending: finish ignores it
		r.finish(tok, nil, fmt.Errorf("%w: peer left the cluster while the request was in flight", ErrTimeout))
	}
}

// callOpts are the per-call options of rpc.call.
type callOpts struct {
	timeout time.Duration
	// alive, if not nil, is watched (see watch): when it turns false the
	// peer is gone from the view and call gives up with ErrTimeout instead
	// of waiting out the timeout: the request may or may not have been
	// processed.
	alive func() bool
	// sent, if not nil, is called once the request was handed to the
	// connection; also when the connection refused it (closed, or its
	// reconnect buffer full): call then returns that error.
	sent func()
}

// callEnvelope is call for an envelope not yet encoded.
func (r *rpc) callEnvelope(ctx context.Context, subject string, env *wire.Envelope, o callOpts) (*wire.Reply, error) {
	data, err := proto.Marshal(env)
	if err != nil {
		return nil, err
	}
	return r.call(ctx, subject, data, o)
}

// call is the blocking form of send. data may be reused once call returns,
// or once sent was called: NATS copies it. The timeout is cut to ctx's
// deadline.
func (r *rpc) call(ctx context.Context, subject string, data []byte, o callOpts) (*wire.Reply, error) {
	timeout := o.timeout
	dl, hasDeadline := ctx.Deadline()
	if hasDeadline && time.Until(dl) < timeout {
		timeout = max(time.Until(dl), time.Millisecond)
	}
	type result struct {
		rep *wire.Reply
		err error
	}
	ch := make(chan result, 1)
	tok := r.send(subject, data, timeout, func(rep *wire.Reply, err error) { ch <- result{rep, err} })
	if o.sent != nil {
		o.sent()
	}
	if o.alive != nil {
		r.watch(tok, o.alive)
	}
	select {
	case res := <-ch:
		if hasDeadline && !time.Now().Before(dl) && errors.Is(res.err, ErrTimeout) && !errors.Is(res.err, context.DeadlineExceeded) {
			// The timer set for ctx's deadline fired before ctx's own (a
			// timeout while the deadline had not passed is the call's own,
			// or another cause's): the caller's deadline is what ran out,
			// and errors.Is says so.
			res.err = fmt.Errorf("%w: %w", res.err, context.DeadlineExceeded)
		}
		return res.rep, res.err
	case <-ctx.Done():
		r.finish(tok, nil, ctx.Err())
		return nil, ctx.Err()
	}
}

func (r *rpc) finish(tok uint64, rep *wire.Reply, err error) {
	r.mu.Lock()
	c, ok := r.pending[tok]
	if ok {
		delete(r.pending, tok)
	}
	r.mu.Unlock()
	if !ok {
		return
	}
	c.timer.Stop()
	c.cb(rep, err)
}

func (r *rpc) onReply(m *nats.Msg) {
	i := strings.LastIndexByte(m.Subject, '.')
	tok, err := strconv.ParseUint(m.Subject[i+1:], 36, 64)
	if err != nil {
		return
	}
	if natsutil.IsNoRespondersMsg(m) {
		r.finish(tok, nil, errNoResponders)
		return
	}
	var env wire.Envelope
	if err := proto.Unmarshal(m.Data, &env); err != nil || env.GetReply() == nil {
		// The request may have been acted on: its outcome is unknown.
		r.finish(tok, nil, fmt.Errorf("%w: malformed reply: %v", ErrTimeout, err))
		return
	}
	r.finish(tok, env.GetReply(), nil)
}

// close fails every pending call with ErrClosed.
func (r *rpc) close() {
	r.mu.Lock()
	r.closed = true
	pending := r.pending
	r.pending = map[uint64]*call{}
	r.mu.Unlock()
	_ = r.sub.Unsubscribe()
	r.laterMu.Lock()
	if r.laterTimer != nil {
		r.laterTimer.Stop()
		r.laterTimer = nil
	}
	r.laterMu.Unlock()
	for _, c := range pending {
		c.timer.Stop()
		c.cb(nil, errClosedInFlight)
	}
}

// replyTo answers a request message; a lost reply surfaces as the
// requester's timeout, so errors are only logged.
func (n *Node) replyTo(subject string, rep *wire.Reply) {
	if subject == "" {
		return
	}
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: rep}})
	if err == nil {
		err = n.nc.Publish(subject, data)
	}
	if err != nil {
		n.log.Debug("reply failed", "subject", subject, "err", err)
	}
}

// retry runs attempt until it reports done, pausing between attempts from
// 5 ms, doubling up to 500 ms. It gives up when ctx ends or the node closes.
func (n *Node) retry(ctx context.Context, attempt func() (done bool)) {
	backoff := 5 * time.Millisecond
	for ctx.Err() == nil && !attempt() {
		if !n.pause(ctx, &backoff, 500*time.Millisecond) {
			return
		}
	}
}

// pause waits *backoff (then doubles it, up to limit) before a retry. It
// reports false, early, when ctx ends or the node closes.
func (n *Node) pause(ctx context.Context, backoff *time.Duration, limit time.Duration) bool {
	t := time.NewTimer(*backoff)
	defer t.Stop()
	*backoff = min(2**backoff, limit)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-n.life.ctx.Done():
		return false
	}
}
