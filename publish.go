package pubsub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// Publisher publishes batches to topics and reports each outcome. *Node
// implements it; a BatchingProducer publishes through one.
//
// err != nil exactly when the ack is Rejected, and then
// errors.Is(err, ack.Reason.Err()) holds. An implementation must return
// soon once ctx is done: a BatchingProducer enforces PublishTimeout only
// through ctx, and waits for each call before its Flush returns. As a last
// resort, when the producer's Close gives up it cancels the ctx of its
// call in flight and waits up to a second more; past that it leaves the
// call running (it may still read the batch's data), drops its result and
// completes the batch with an unknown outcome (ErrTimeout), so that Close
// returns.
type Publisher interface {
	Publish(ctx context.Context, topic string, data []byte) (PublishAck, error)
	PublishBatch(ctx context.Context, topic string, batch [][]byte) (PublishAck, error)
}

// Initializer warms a topic up before the first publish. *Node implements it.
type Initializer interface {
	Initialize(ctx context.Context, topic string) error
}

var (
	_ Publisher   = (*Node)(nil)
	_ Initializer = (*Node)(nil)
)

// Publish publishes one message; see PublishBatch.
func (n *Node) Publish(ctx context.Context, topic string, data []byte) (PublishAck, error) {
	return n.PublishBatch(ctx, topic, [][]byte{data})
}

// PublishBatch sends batch to the topic's owner and returns its ack once every
// subscriber the owner knew at acceptance processed it, failed, or timed out.
// When ctx's deadline comes before the owner's own wait would end, the
// owner answers just before that deadline: the subscribers that had not
// reported yet are listed as Timeout (outcome unknown: their delivery goes
// on), so a short deadline still tells which subscribers ran the batch.
// Messages reach each subscriber in order. A batch holding a message larger
// than MaxMessageSize is rejected whole with ErrTooLarge; a batch only too
// large in total is split into several publishes, in order, and their acks
// merged. An empty batch is Accepted at once, asking no owner (use
// Initialize to check a topic is served). Messages are not copied on their way to this node's own
// subscribers: do not modify them before PublishBatch returns, nor after it
// if a subscriber timed out and may still be reading them.
func (n *Node) PublishBatch(ctx context.Context, topic string, batch [][]byte) (PublishAck, error) {
	b, err := plainBatch(ctx, batch, n.cfg.Propagator)
	if err != nil {
		start := hookClock(n.hooks.publish)
		ack, err := n.reject(topic, len(batch), fmt.Errorf("pubsub: publish to %q: %w", topic, err))
		n.published(topic, len(batch), dataBytes(batch), start, ack, err)
		return ack, err
	}
	return n.publishBatchIssued(ctx, topic, b, issueOpts{})
}

// PublishMessages publishes msgs, each with its optional key and header, as
// one batch: PublishBatch's semantics and ack. A header name that is empty
// or holds whitespace, ':' or a control character rejects the batch whole
// with ErrInvalidMessage; keys and headers count towards MaxMessageSize.
// With a Propagator, its Inject adds to a copy of each message's header.
// Neither the messages nor their headers are copied on their way to this
// node's own subscribers: do not modify them before PublishMessages returns.
func (n *Node) PublishMessages(ctx context.Context, topic string, msgs []Outgoing, opts ...PublishOption) (PublishAck, error) {
	var cfg publishConfig
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	start := hookClock(n.hooks.publish)
	if cfg.ack > AckNone {
		ack, err := n.reject(topic, len(msgs), fmt.Errorf("%w: publish to %q: WithAck(%s): not an AckLevel", ErrInvalidConfig, topic, cfg.ack))
		n.published(topic, len(msgs), outgoingBytes(msgs), start, ack, err)
		return ack, err
	}
	b, err := outgoingBatch(ctx, msgs, n.cfg.Propagator)
	if err != nil {
		ack, err := n.reject(topic, len(msgs), fmt.Errorf("pubsub: publish to %q: %w", topic, err))
		ack.Level = cfg.ack
		n.published(topic, len(msgs), outgoingBytes(msgs), start, ack, err)
		return ack, err
	}
	return n.publishBatchIssued(ctx, topic, b, issueOpts{level: cfg.ack})
}

// batchOrigin names one batch of one BatchingProducer; the zero value, for
// plain Publish calls, names none.
type batchOrigin struct {
	producer string
	seq      uint64 // increases with each batch of the producer
	// reroute: a group member's share re-routed to another member; seq
	// then only tells copies of it apart (subscribers keep it beside the
	// producer's order, which a re-route does not follow).
	reroute bool
	at      uint64 // a re-routed share's positions in the batch (positionsMark)
	// prev is the producer's batch before this one, and settled the
	// highest batch up to which all its batches are settled (answered or
	// failed), as known when the attempt left: an owner that has not seen
	// prev serves this batch only once prev is settled. 0: no such check
	// (plain publishes, split batches). Both count batches, not chunks.
	prev       uint64
	settled    uint64
	settledNow func() uint64 // the producer's current settled, read per attempt
	// atLeastOnce, on a delivery: the topic is AtLeastOnce, so a group
	// member runs a retried batch's new share rather than drop it.
	atLeastOnce bool
	// split names a chunk of a batch split into several requests; zero
	// for a batch sent whole. It stays the same across a chunk's attempts.
	split splitChunk
}

// splitChunk names chunk index of the split batch id (random, not 0).
// Subscribers run a split batch's chunks from the first, in order, and
// none after one they did not run (split_chain.go: splitGate): the
// publisher's skip list tells the owner only of failures answered before
// the next chunk leaves, and an answer at the publisher's deadline
// (answer_by.go) leaves a slow subscriber's outcome to come.
type splitChunk struct {
	id    uint64
	index uint32
}

// chunk names chunk i of a batch split for size; chunks keep the order.
func (o batchOrigin) chunk(i int) batchOrigin {
	if o.producer == "" {
		return o
	}
	o.seq = o.seq<<16 | uint64(i)
	return o
}

// refresh reads the producer's settled batch for the next attempt.
func (o *batchOrigin) refresh() {
	if o.settledNow != nil {
		o.settled = o.settledNow()
	}
}

// mustWaitFor reports whether an owner that last accepted batch number last
// of this producer (0: none) must hold this batch back: its previous batch
// was accepted elsewhere, or not yet, and is not settled, so serving this
// one now could put it ahead of that one at the subscribers.
func (o batchOrigin) mustWaitFor(last uint64) bool {
	return o.producer != "" && o.prev != 0 && last>>16 < o.prev && o.settled < o.prev
}

// publishBatchIssued is PublishBatch that calls issued (if not nil) once the
// batch's place in this node's order towards the owner is fixed: queued on
// the local topic actor, or written to the connection. A BatchingProducer
// starts its next batch then, so several can be in flight in order. A retry
// after a redirect (ownership moving) can still reorder two batches in
// flight.
func (n *Node) publishBatchIssued(ctx context.Context, topic string, batch msgBatch, o issueOpts) (PublishAck, error) {
	start := hookClock(n.hooks.publish)
	ack, err := n.publishLevel(ctx, topic, batch, o)
	ack.Level = o.level
	if len(n.hooks.publish) != 0 {
		n.published(topic, batch.len(), batch.bytes(), start, ack, err)
	}
	return ack, err
}

// issueOpts are publishBatchIssued's options: the issue notice, the
// producer batch (zero for plain publishes) and the ack level.
type issueOpts struct {
	issued   func()
	producer string
	seq      uint64
	prev     uint64
	settled  func() uint64
	level    AckLevel
}

func (n *Node) publishLevel(ctx context.Context, topic string, batch msgBatch, o issueOpts) (PublishAck, error) {
	issued := o.issued
	count := batch.len()
	if err := validateTopic(topic); err != nil {
		return n.reject(topic, count, err)
	}
	if n.life.closed.Load() {
		return n.reject(topic, count, fmt.Errorf("pubsub: publish to %q: %w", topic, ErrClosed))
	}
	if err := ctx.Err(); err != nil {
		return n.reject(topic, count, fmt.Errorf("pubsub: publish to %q: %w", topic, err))
	}
	limit := n.MaxMessageSize()
	packed := 0 // the size chunks counts, in one pass with the check
	for i := range batch.data {
		size := batch.size(i)
		if size > limit {
			return n.reject(topic, count, fmt.Errorf("pubsub: publish to %q: message %d is %d bytes with its key and header, limit %d: %w", topic, i, size, limit, ErrTooLarge))
		}
		packed += size + 8
	}
	if count == 0 {
		if issued != nil {
			issued()
		}
		return PublishAck{Topic: topic, Status: Accepted}, nil
	}
	split := packed > limit
	if o.level == AckNone && o.producer == "" && issued == nil && batch.meta == nil && !split {
		if handled, err := n.publishMerged(ctx, topic, batch); handled {
			if err != nil {
				return n.reject(topic, count, fmt.Errorf("pubsub: publish to %q: %w", topic, err))
			}
			return PublishAck{Topic: topic, Status: Accepted, Messages: count}, nil
		}
	}
	var total chunkAcks
	origin := batchOrigin{producer: o.producer, seq: o.seq, prev: o.prev, settledNow: o.settled}
	if o.settled == nil || split {
		origin.prev = 0 // split batches are not held back: their chunks go one by one
	}
	var splitID uint64
	if split {
		splitID = rand.Uint64() | 1
	}
	for i, run := range chunks(batch, limit, split) {
		var sig func() // only the last chunk fixes the batch's place
		if run.end == count {
			sig = issued
		}
		// A quarter of the room MaxMessageSize leaves for the envelope.
		skip := total.skip((n.maxPayload() - limit) / 4)
		chunk := origin.chunk(i)
		if split {
			chunk.split = splitChunk{id: splitID, index: uint32(i)}
		}
		ans, err := n.publishChunk(ctx, topic, batch.slice(run.start, run.end), sig, chunk, split, o.level, skip)
		if err != nil && i > 0 && !errors.Is(err, ErrTimeout) {
			// Earlier chunks were delivered: the batch was not "not taken".
			err = fmt.Errorf("%w: chunk %d failed after earlier chunks of the batch were accepted: %v", ErrTimeout, i, err)
		}
		if err != nil {
			return n.reject(topic, count, err)
		}
		total.add(i, ans)
	}
	ack := total.ack
	ack.Messages = count
	return ack, nil
}

// publisherSide numbers this node's plain publishes as the batches of one
// implicit producer per node incarnation (see numberAttempt).
type publisherSide struct {
	key   string // the implicit producer's ID: node ID and incarnation tag
	seq   atomic.Uint64
	order [64]sync.Mutex // by topic hash: numbers follow the order requests leave
	out   outboxes       // merged AckNone publishes (outbox.go)
	kept  keptCopies     // copies of batches sent to remote owners (kept.go)
}

func (p *publisherSide) init(node, tag string, keep time.Duration) {
	p.key = node + "/" + tag
	p.out.init()
	p.kept.init(keep)
}

// numberAttempt gives one attempt of a plain publish its place among this
// node's publishes to topic: the next number of the node's implicit
// producer, taken under a lock held until the attempt is queued on the
// owner's actor or written to the connection (the returned release), so
// numbers follow the order requests leave the node. Subscribers drop a batch
// numbered below one they already handled, as they do for a
// BatchingProducer: a request held up on a stalled route, whose publish
// already returned ErrTimeout, then never arrives after a later one, even
// through another owner. Each attempt is numbered anew: one answered "not
// owner" or "not ready" delivered nothing, and keeping its old number would
// make its retry look late beside publishes numbered meanwhile.
func (p *publisherSide) numberAttempt(topic string, origin *batchOrigin) (release func()) {
	stripe := &p.order[fnvString(fnvOffset, topic)%uint64(len(p.order))]
	stripe.Lock()
	*origin = batchOrigin{producer: p.key, seq: p.seq.Add(1), split: origin.split}
	return sync.OnceFunc(stripe.Unlock)
}

// reject builds a Rejected ack on the publisher side and emits it.
func (n *Node) reject(topic string, messages int, err error) (PublishAck, error) {
	ack, err := rejected(topic, messages, err)
	n.stats.rejected.Add(uint64(messages))
	emit(n.events, PublishRejected{Topic: topic, Messages: messages, Reason: ack.Reason})
	return ack, err
}

// MaxMessageSize is the largest message this node publishes: the payload
// limit less room for the envelope and subscriber lists. The payload limit
// is the smallest max_payload of this node's server and of the servers of
// the members in its view that may own topics (not client-only; a member
// that does not advertise its limit, from an older version, is not
// counted): a topic's owner forwards on its own connection, so in a cluster
// whose servers differ in max_payload the smallest owner's limit applies
// to every publisher. It may shrink when a member on a smaller server
// joins.
func (n *Node) MaxMessageSize() int {
	mp := n.maxPayload()
	if owners := int(n.members.peerPayload.Load()); owners > 0 {
		mp = min(mp, owners)
	}
	return mp - min(64<<10, mp/8)
}

func (n *Node) maxPayload() int { return int(n.nc.MaxPayload()) }

// publishChunk publishes one request's worth of a batch. With split, the
// owner also lists the subscribers it delivered to, for chunkAcks, and
// leaves out those in skip, which failed an earlier chunk.
func (n *Node) publishChunk(ctx context.Context, topic string, msgs msgBatch, issued func(), origin batchOrigin, split bool, level AckLevel, skip []*wire.Failure) (ownerAnswer, error) {
	req := &publishRequest{wire: &wire.PublishRequest{From: n.selfRef(), Topic: topic, Count: uint32(msgs.len()), DeliveredIds: split, AckLevel: uint32(level), Skip: skip},
		msgs: msgs, origin: &origin, wantIDs: split}
	call := ownerCall{wait: n.cfg.SubscriberTimeout + n.cfg.RequestTimeout, issued: issued, noAnswer: level == AckNone}
	if level == AckDelivered && !n.cfg.silentWait {
		// The owner answers before this wait ends, whichever of its own
		// timeouts and this node's is longer (answer_by.go, answerEarly).
		req.wait = call.wait
		req.deadline, _ = ctx.Deadline()
	}
	if origin.producer == "" {
		call.attempt = func() func() { return n.publisher.numberAttempt(topic, &origin) }
		if ob := n.publisher.out.lookup(topic); ob != nil {
			// AckNone publishes merged before this one leave first; the
			// outbox's token is held until this request is written.
			if err := n.flushOutbox(ctx, context.Background(), ob); err != nil {
				return ownerAnswer{}, fmt.Errorf("pubsub: publish to %q: %w", topic, err)
			}
			held := true
			defer func() {
				if held {
					ob.unhold()
				}
			}()
			call.attempt = func() func() {
				release := n.publisher.numberAttempt(topic, &origin)
				if !held {
					return release
				}
				return func() {
					release()
					held = false
					ob.unhold()
				}
			}
		}
	}
	ans, err := n.toOwner(ctx, topic, req, call)
	if err != nil {
		return ownerAnswer{}, fmt.Errorf("pubsub: publish to %q: %w", topic, err)
	}
	ans.ack.Topic = topic
	return ans, nil
}

// Initialize validates topic and returns once its owner serves it, or with
// ErrTopicUnavailable (or the ctx error) when no owner does within the
// request timeout, ErrQueueFull when the owner stayed overloaded (its queue
// for the topic full) as long; ErrInvalidTopic for an invalid topic,
// ErrClosed once the node closed. Services call it at start to fail fast.
func (n *Node) Initialize(ctx context.Context, topic string) error {
	if err := validateTopic(topic); err != nil {
		return err
	}
	// An empty publish is answered by a ready owner and delivers nothing.
	_, err := n.toOwner(ctx, topic, readinessProbe{from: n.selfRef(), topic: topic}, ownerCall{probe: true})
	if err != nil {
		return fmt.Errorf("pubsub: initialize %q: %w", topic, err)
	}
	return nil
}

// validateTopic checks a topic name, wrapping ErrInvalidTopic.
func validateTopic(topic string) error {
	if err := natsutil.ValidateTopic(topic); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidTopic, err)
	}
	return nil
}

var (
	_ orderedPublisher = (*Node)(nil)
	_ publishWaiter    = (*Node)(nil)
	_ publisherLogger  = (*Node)(nil)
)

// publishWait mirrors the wait publishChunk gives one attempt to the owner:
// a producer's attempt outlives it by default (producer_wait.go).
func (n *Node) publishWait() time.Duration {
	return n.cfg.SubscriberTimeout + n.cfg.RequestTimeout
}

// logger is where a producer publishing through the node logs.
func (n *Node) logger() *slog.Logger { return n.log.Logger }

// appendEnvelope appends env's encoding to buf.
func appendEnvelope(buf []byte, env *wire.Envelope) []byte {
	out, err := proto.MarshalOptions{}.MarshalAppend(buf, env)
	if err != nil {
		panic(fmt.Sprintf("pubsub: encoding %T: %v", env.Body, err)) // our own messages always encode
	}
	return out
}
