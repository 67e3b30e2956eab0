package pubsub

import (
	"context"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// How the producer works, for maintainers:
//
//   - Intake. Produce appends an entry to a mutex-guarded chain of
//     fixed-size blocks (producer_intake.go) and, only when
//     the actor asked to hear about it (wakeLen/wakeBytes), nudges it through
//     a 1-buffered channel. There is no goroutine and no channel per message:
//     futures come from slabs of 512 and allocate their done channel only when
//     someone calls Done, or Wait before completion.
//   - Batches. One goroutine, the actor, alone changes the producer's state.
//     It takes the whole chain once it read its own and cuts batches from
//     it, dropping messages whose context is already done. Each attempt runs
//     on its own goroutine, which reports back on a channel; attempts start
//     in batch order, and the next one starts only once the previous one was
//     issued (see orderedPublisher).
//   - Order. Batches sit in a FIFO; futures are completed from its head only,
//     so they complete in produce order whatever order the attempts finish
//     in. Flush relies on it: it waits for the last future.
//   - Errors. A failed attempt goes to OnPublishError on the actor's
//     goroutine. While a batch waits to be retried no new batch starts.
//   - Shutdown. Close stops intake and lets the actor drain; if Close's ctx
//     ends first it cancels the producer's lifetime context, which aborts
//     attempts and retry waits, and the actor fails what is left with
//     ErrClosed. The actor returns once no attempt goroutine is left.

// BatchingProducer publishes single messages to one topic in batches.
// Produce queues a message and returns its future at once; the producer's
// goroutine cuts batches of up to BatchSize messages (sent at once when
// nothing is in flight, or after Linger) and publishes them through a
// Publisher, usually a *Node, in order, retrying or failing them as
// OnPublishError decides. Every message's future completes with its batch's
// PublishAck or with why it was not published. Messages produced from one
// goroutine reach every subscriber in produce order.
//
// A BatchingProducer is safe for concurrent use. Close it to release its
// goroutine.
type BatchingProducer struct {
	pub    Publisher
	init   Initializer // nil when pub does not implement it
	topic  string
	cfg    ProducerConfig
	maxMsg int    // largest message Produce accepts
	id     string // names this producer's batches to subscriber nodes
	// prop is the node's Propagator, if pub is a *Node with one; metaPub
	// is pub when it can carry keys and headers.
	prop    Propagator
	metaPub messagePublisher

	ctx       context.Context // the producer's lifetime: cancelled when Close gives up or its node closed
	cancel    context.CancelFunc
	nodeLife  context.Context   // its *Node's lifetime (nil for other publishers): says which of the two ended it
	wake      chan struct{}     // 1-buffered nudge from Produce, Flush and Close
	events    chan attemptEvent // attempt goroutines report here
	exited    chan struct{}     // closed when the actor returns
	abandoned atomic.Bool       // the actor failed work because the lifetime ended
	full      *Produced         // shared future, already done with ErrQueueFull
	counters  producerCounters  // outcomes of its futures, for Stats

	producerIntake // what Produce queued: guarded by its mu (producer_intake.go)
	producerState  // the actor's own: touched only by the producer goroutine (producer_actor.go)
}

// producerEntry is one message of a cut batch (queued ones are
// intakeEntry, read as queuedMessage).
type producerEntry struct {
	ctx     context.Context
	data    []byte
	meta    wire.Meta // key and header, after the propagator's Inject
	fut     *Produced
	dropped bool // its context ended before the batch was sent
	// maybeSent: dropped from a retry, after an attempt whose outcome is
	// unknown (it may have been delivered), with every other message of
	// its batch (see retryDue): it completes with that outcome.
	maybeSent bool
}

// producerBatch is one batch from its cut until its futures complete.
type producerBatch struct {
	entries  []producerEntry // in produce order, dropped ones included
	msgs     msgBatch        // the entries not dropped
	state    batchState
	id       uint64 // ID of the current attempt
	seq      uint64 // the batch's number in this producer's order
	failures int    // failed attempts so far
	retryAt  time.Time
	retrying bool           // counted in BatchingProducer.retrying
	last     *produceResult // outcome of the last failed attempt
	unknown  *produceResult // a failed attempt whose outcome is unknown (ReasonTimeout), if any
	res      *produceResult // final outcome of the entries not dropped
	reuse    bool           // msgs may be reused: the publisher holds no reference
	stopped  bool           // its failure stopped the producer
}

type batchState uint8

const (
	batchCut       batchState = iota // cut, never issued
	batchRunning                     // an attempt is running
	batchRetryWait                   // failed, waiting for retryAt
	batchResolved                    // outcome known; futures complete when it reaches the FIFO head
)

// attemptEvent is an attempt goroutine's report to the actor.
type attemptEvent struct {
	id          uint64
	b           *producerBatch
	issued      bool // only an issue notice: the next batch may start
	initialized bool // Initialize succeeded during this attempt
	initFailed  bool // Initialize failed: nothing was published
	ack         PublishAck
	err         error
}

// orderedPublisher is implemented by a Publisher that can tell when a
// batch's place in its per-publisher order is fixed (for a Node: once the
// request is queued on the owner's topic actor, or written to the NATS
// connection, as one request). A BatchingProducer with MaxInFlight > 1
// starts the next batch only after issued was called (or the call
// returned), so batches keep their order while several are in flight.
//
// A publisher without it gets one batch at a time whatever MaxInFlight
// says: two PublishBatch calls started one after the other from two
// goroutines may reach the owner in either order (the second can simply be
// scheduled first, or take less time to validate and encode), and the order
// of messages is a guarantee while pipelining is only an optimisation.
//
// issued must be called at most once, and not after the call returned.
type orderedPublisher interface {
	publishBatchIssued(ctx context.Context, topic string, batch msgBatch, o issueOpts) (PublishAck, error)
}

// messagePublisher is a Publisher that carries keys and headers; *Node is
// one.
type messagePublisher interface {
	PublishMessages(ctx context.Context, topic string, msgs []Outgoing, opts ...PublishOption) (PublishAck, error)
}

// messageSizer is implemented by publishers that know their message size
// limit; *Node does.
type messageSizer interface {
	MaxMessageSize() int
}

// NewBatchingProducer returns a producer of messages for topic, published
// through p, and starts its goroutine. Zero fields of cfg take their
// defaults; a negative one fails with ErrInvalidConfig, an invalid topic with
// ErrInvalidTopic. Call Close to stop the goroutine, and to publish what is
// queued first. A producer publishing through a *Node also stops when that
// node has closed (after its Close drained, or on losing its connection),
// as if a Close had given up: what is still queued completes with
// ReasonClosed, and later Produce calls with ErrClosed.
func NewBatchingProducer(p Publisher, topic string, cfg ProducerConfig) (*BatchingProducer, error) {
	if p == nil || isNilPointer(p) {
		return nil, fmt.Errorf("%w: producer: Publisher is nil; pass a *Node or another Publisher", ErrInvalidConfig)
	}
	if err := validateTopic(topic); err != nil {
		return nil, fmt.Errorf("pubsub: producer: %w", err)
	}
	if err := cfg.resolve(p); err != nil {
		return nil, fmt.Errorf("pubsub: producer for %q: %w", topic, err)
	}
	warnShortPublishTimeout(p, topic, cfg.PublishTimeout)
	bp := &BatchingProducer{
		pub:            p,
		id:             randomID(),
		topic:          topic,
		cfg:            cfg,
		maxMsg:         cfg.MaxBatchBytes,
		wake:           make(chan struct{}, 1),
		events:         make(chan attemptEvent, 2*cfg.MaxInFlight),
		exited:         make(chan struct{}),
		producerIntake: producerIntake{wakeLen: 1, wakeBytes: math.MaxInt},
	}
	if limit := messageLimit(p); limit > 0 {
		bp.maxMsg = min(bp.maxMsg, limit)
	}
	bp.init, _ = p.(Initializer)
	bp.metaPub, _ = p.(messagePublisher)
	if n, ok := p.(*Node); ok {
		bp.prop = n.cfg.Propagator
	}
	bp.initialized = bp.init == nil
	bp.full = doneFuture(bp.failure(fmt.Errorf("pubsub: producer for %q: %d messages queued: %w", topic, cfg.MaxQueueSize, ErrQueueFull)))
	life := context.Background()
	if n, ok := p.(*Node); ok && n.life.ctx != nil {
		// A producer its user forgot to Close stops with its node: once
		// the node shut down every attempt would fail ErrClosed, and its
		// goroutine would outlive the node for good.
		life = n.life.ctx
		bp.nodeLife = life
	}
	bp.ctx, bp.cancel = context.WithCancel(life)
	go bp.run()
	return bp, nil
}

// Topic returns the topic the producer publishes to.
func (p *BatchingProducer) Topic() string { return p.topic }

// Produce queues data for publishing and returns its future at once; it
// never blocks, unless ProducerConfig.BlockWhenFull asks it to wait for
// room in a full queue. The future is already done when data is larger
// than MaxBatchBytes (ErrTooLarge), when MaxQueueSize messages are queued
// (ErrQueueFull; with BlockWhenFull, when ctx ends while Produce waits for
// room: ctx's error), when ctx has ended (its error), and after Close or
// after the producer stopped (ErrClosed). Futures already done with
// ErrQueueFull or ErrClosed may be shared between calls.
//
// If ctx ends before the message's batch is sent (or retried), the message
// is left out of it and its future completes with ctx's error
// (ReasonCancelled). Once an attempt of the batch had an unknown outcome
// (ReasonTimeout: it may have delivered the message), its retries send the
// same messages whatever their contexts, and the message completes with
// the batch's outcome; only if every message's context ended is the batch
// not retried, and then the message completes with that ReasonTimeout,
// wrapping ctx's error. Data is not copied: do not modify it until the
// future is done (and, with a Publisher other than a *Node that ignores
// its cancelled ctx, until that call returns: see Close).
func (p *BatchingProducer) Produce(ctx context.Context, data []byte) *Produced {
	var meta wire.Meta
	if p.prop != nil {
		var err error
		if meta, err = messageMeta(ctx, "", nil, p.prop); err != nil {
			return p.refused(p.failure(fmt.Errorf("pubsub: producer for %q: %w", p.topic, err)))
		}
	}
	return p.produce(ctx, data, meta)
}

// ProduceMessage queues m, with its key and header, like Produce. A header
// name that is empty or holds whitespace, ':' or a control character fails
// the future with ErrInvalidMessage; the key and header count towards the
// message's size. With a Propagator on the producer's node, Inject runs
// here with ctx, on a copy of m.Header. Neither m.Data nor m.Header is
// copied otherwise: do not modify them until the future is done (see
// Produce for a Publisher that ignores its ctx). A
// Publisher other than a *Node must implement PublishMessages to carry keys
// and headers; otherwise such a message fails with ErrInvalidConfig.
func (p *BatchingProducer) ProduceMessage(ctx context.Context, m Outgoing) *Produced {
	meta, err := messageMeta(ctx, m.Key, m.Header, p.prop)
	if err != nil {
		return p.refused(p.failure(fmt.Errorf("pubsub: producer for %q: %w", p.topic, err)))
	}
	if !meta.Empty() && p.metaPub == nil {
		return p.refused(p.failure(fmt.Errorf("%w: producer for %q: its Publisher (%T) has no PublishMessages to carry keys and headers", ErrInvalidConfig, p.topic, p.pub)))
	}
	return p.produce(ctx, m.Data, meta)
}

func (p *BatchingProducer) produce(ctx context.Context, data []byte, meta wire.Meta) *Produced {
	if size := len(data); size > p.maxMsg || (!meta.Empty() && size+wire.MetaSize(meta) > p.maxMsg) {
		return p.refused(p.failure(fmt.Errorf("pubsub: producer for %q: message of %d bytes with its key and header, limit %d: %w", p.topic, size+wire.MetaSize(meta), p.maxMsg, ErrTooLarge)))
	}
	if err := ctx.Err(); err != nil {
		return p.refused(p.cancelled(err))
	}
	p.mu.Lock()
	if p.closed != nil {
		f := p.closed
		p.mu.Unlock()
		return p.shared(f)
	}
	for p.queued >= p.cfg.MaxQueueSize {
		if !p.cfg.BlockWhenFull {
			p.mu.Unlock()
			p.counters.queueFull.Add(1)
			return p.shared(p.full)
		}
		if p.room == nil {
			p.room = make(chan struct{})
		}
		room := p.room
		p.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return p.refused(p.cancelled(ctx.Err()))
		}
		p.mu.Lock()
		if p.closed != nil {
			f := p.closed
			p.mu.Unlock()
			return p.shared(f)
		}
	}
	if len(p.slab) == 0 {
		p.slab = make([]Produced, futureSlab)
	}
	f := &p.slab[0]
	f.topic = &p.topic
	p.slab = p.slab[1:]
	m := queuedMessage{ctx: ctx, data: data, fut: f}
	if !meta.Empty() {
		mt := meta // on the heap only here: a plain message holds no Meta
		m.meta = &mt
	}
	p.in.push(m)
	p.queued++
	p.qbytes += m.size()
	p.seq++
	p.last = f
	if p.queued == 1 && p.cfg.Linger > 0 {
		p.firstAt = time.Now()
	}
	wake := p.queued >= p.wakeLen || p.qbytes >= p.wakeBytes
	if wake {
		p.wakeLen, p.wakeBytes = math.MaxInt, math.MaxInt // the actor resets them
	}
	p.mu.Unlock()
	if wake {
		p.nudge()
	}
	return f
}

// Flush sends every queued message without waiting for Linger and returns
// nil once every message produced before the call is done, whatever its
// outcome; it returns ctx's error if ctx ends first.
func (p *BatchingProducer) Flush(ctx context.Context) error {
	p.mu.Lock()
	last := p.last
	p.flushSeq = p.seq
	p.mu.Unlock()
	if last == nil || last.res.Load() != nil {
		return nil
	}
	p.nudge()
	select {
	case <-last.Done():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops intake (a later Produce returns ErrClosed), publishes what is
// queued while ctx allows (with retries, if OnPublishError asks for them),
// and returns once the producer's goroutine has ended. If ctx ends first,
// Close aborts the attempts in flight and the retry waits, completes every
// unfinished future with ErrClosed and returns ctx's error. A message that
// was never sent, or whose last attempt was refused outright, completes
// with ReasonClosed; one of a batch in flight, or waiting for a retry after
// an attempt with an unknown outcome, completes with ReasonTimeout (outcome
// unknown: its subscribers may have run it), and its error wraps both
// ErrTimeout and ErrClosed. Close returns at most about a second after
// ctx ends even if a Publisher (or Initializer) that is not a *Node
// ignores its cancelled ctx: the call is left running and its result
// dropped, and it may still read the batch's data after the futures
// completed. A producer
// stopped by FailBatchAndStop, or by its node before Close gave up, closes
// with nil. A second Close waits like the first and returns nil.
func (p *BatchingProducer) Close(ctx context.Context) error {
	// The lifetime may have ended without this Close (its node closed, or
	// the actor returned): giving up then aborts nothing.
	ended := p.ctx.Err() != nil
	early := !ended && ctx.Err() != nil
	if early {
		// ctx allows nothing: the lifetime ends before the actor can see
		// closing (pump reads it under mu, with the lifetime), or it would
		// start the queued batches.
		p.cancel()
	}
	p.mu.Lock()
	again := p.closing
	p.closing = true
	if p.closed == nil {
		p.closed = doneFuture(p.failure(fmt.Errorf("pubsub: producer for %q: %w", p.topic, ErrClosed)))
	}
	p.freeRoom()
	p.mu.Unlock()
	p.nudge()
	if !early { // else the lifetime is over: only the abort is left to wait for
		select {
		case <-p.exited:
			return nil
		case <-ctx.Done():
		}
		if ended || p.ctx.Err() != nil {
			<-p.exited
			return nil
		}
	}
	p.cancel()
	<-p.exited // the attempts in flight return once their context is cancelled, or abortGrace later (untilLifetimeEnds)
	if again || !p.abandoned.Load() {
		return nil
	}
	return ctx.Err()
}
