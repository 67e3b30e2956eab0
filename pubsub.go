// Package pubsub is actor-cluster-style publish/subscribe over an existing
// NATS deployment: the model of Proto.Actor's cluster Pub-Sub and Akka's
// DistributedPubSub, with NATS as transport and cluster router.
//
// A process takes part by joining with the *nats.Conn it already has:
//
//	node, err := pubsub.Join(ctx, nc, pubsub.WithNodeID("orders-1"))
//	if err != nil { ... }
//	defer func() {
//		// A ctx of its own: Join's may have ended by then.
//		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//		defer cancel()
//		_ = node.Close(ctx)
//	}()
//
// Nodes find each other through heartbeats on <prefix>.members and agree on
// a view of the live members. Every topic has exactly one owner in a view:
// the member with the highest rendezvous hash of (topic, node ID), so only
// the topics of a joining or leaving member move. The owner is the single
// authority for the topic's subscriber list.
//
// Subscribe registers a handler with the topic's owner and returns once the
// owner recorded it; every publish the owner accepts afterwards reaches it.
// A subscription is soft state held by its own node: when ownership moves,
// every node re-registers its subscriptions with the new owner, and the new
// owner serves the topic only once it heard from every live member.
//
// Publish sends a batch to the topic's owner, which groups the subscribers by
// node and sends one batch per node on that node's inbox subject,
// <prefix>.node.<id>. The node puts the batch in each subscriber's bounded
// mailbox; each subscriber's handler runs on its own goroutine (only while it
// has work). The per-subscriber outcomes travel back to the owner, which
// answers the publisher with a PublishAck: Accepted with the delivered count
// and every failure, or Rejected with a Reason. When publisher, owner and
// subscriber are one node, nothing is encoded and nothing crosses NATS.
//
// For high rates use a BatchingProducer, which batches, pipelines and keeps
// per-message futures. Every decision the library makes is observable on
// Node.Events.
//
// Messages can carry a routing key and a header (PublishMessages,
// Outgoing, Header), and a Propagator carries trace context through them;
// Topic[T] is a typed view of a topic through a Codec. WithGroup makes
// subscribers a consumer group: each message reaches one member, the same
// one for a key. WithAck chooses what a publish waits for: every
// subscriber (the default), the owner's acceptance, or nothing. A node
// joined WithClientOnly never owns a topic.
package pubsub

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// Node is one process's participant in the cluster. It is safe for
// concurrent use. *Node implements Publisher and Initializer.
type Node struct {
	// A Node wires together the roles it plays, each with its own state and
	// locks: its membership (membership.go), the owner side of the topics it
	// owns (owner.go, topic_actor.go, handoff.go), the subscriber side of its
	// own subscriptions (subscribers.go, delivery.go) and the publisher side
	// of its publishes (publish.go).

	cfg        Config
	self       Member // this node: ID, incarnation, inbox subject
	nc         *nats.Conn
	log        nodeLogger
	rpc        *rpc
	events     *EventStream
	life       lifecycle
	members    membership
	owner      ownerSide
	subscriber subscriberSide
	publisher  publisherSide
	stats      nodeStats
	marks      markBudget // producer marks its actors and subscriptions hold (producer_marks.go)
	hooks      hookSet
}

// lifecycle is what starts and stops a node: its context, its goroutines and
// its inbox subscription.
type lifecycle struct {
	ctx          context.Context // cancelled by Close
	cancel       context.CancelFunc
	closed       atomic.Bool   // calls fail with ErrClosed
	closeOnce    sync.Once     // shutdown runs once, from Close or on connection loss
	closeCalled  atomic.Bool   // Close was called
	closeDone    chan struct{} // closed when the first Close returns
	goroutines   group         // every goroutine the node started, for Close to wait
	inboxSub     *nats.Subscription
	stopBeats    chan struct{} // closed by Close before its LEAVE
	beatsStopped chan struct{} // closed when the heartbeat loop returned
	drain        drainState    // Close's drain: handovers served, leaves seen
}

// Join makes a node over nc and returns once it has a stable view of the
// existing members (or after MemberTimeout if views keep changing; members
// refusing it for MaxMembers are asked again for up to a quarter of
// MemberTimeout more). The caller keeps ownership of nc: Close does not
// close it.
//
// The first node of a cluster returns after a short quiet period (the
// heartbeat interval, at most 100 ms) when nothing else subscribes to
// <prefix>.members: its NATS server answers "no responders" to a probe
// there. While anything does (a member slow to answer, a tool watching the
// subject, a JetStream stream capturing it), Join waits for a member's answer rather than take silence
// for an empty cluster, up to MemberTimeout, and then joins alone; a member
// closing answers that it leaves.
//
// It fails with ErrInvalidConfig for a nil nc, an invalid option, a node ID
// a live node already uses, a NATS user without the permissions the node
// needs (the error says which to grant), or every member refusing the node
// at Join's deadline because its view holds MaxMembers; with ErrClosed when
// nc is closed, draining or otherwise cannot be used, or closes or is
// replaced while joining (the error wraps what NATS said); with ErrTimeout
// when the permission check got no answer within RequestTimeout; or with
// ctx's error.
func Join(ctx context.Context, nc *nats.Conn, opts ...Option) (*Node, error) {
	if nc == nil {
		return nil, fmt.Errorf("%w: nil *nats.Conn", ErrInvalidConfig)
	}
	if nc.IsClosed() {
		return nil, fmt.Errorf("pubsub: join: %w: nats connection is closed", ErrClosed)
	}
	var cfg Config
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if err := cfg.resolve(); err != nil {
		return nil, err
	}
	hooks, err := newHookSet(cfg.Hooks)
	if err != nil {
		return nil, err
	}
	n := &Node{
		cfg:   cfg,
		nc:    nc,
		hooks: hooks,
		// Incarnations grow with time, so peers tell a restarted node from a
		// stale message of its previous life.
		self:   Member{ID: cfg.NodeID, Incarnation: uint64(time.Now().UnixNano()), Inbox: natsutil.NodeSubject(cfg.Prefix, cfg.NodeID), ClientOnly: cfg.ClientOnly},
		log:    nodeLogger{Logger: cfg.Logger.With("node", cfg.NodeID), limit: logThrottle{interval: logThrottleInterval}},
		events: newEventStream(cfg.NodeID),
	}
	n.events.log = &n.log
	n.marks.limit.Store(maxNodeProducerMarks)
	n.life.ctx, n.life.cancel = context.WithCancel(context.Background())
	n.life.stopBeats, n.life.beatsStopped = make(chan struct{}), make(chan struct{})
	n.life.closeDone = make(chan struct{})
	n.members.init(n)
	n.owner.init(n)
	n.subscriber.init()
	n.publisher.init(n.self.ID, n.subscriber.tag, keptFor(cfg))

	announced := false
	fail := func(err error) (*Node, error) {
		if announced {
			// Peers may have added this incarnation: take it back at once
			// rather than leave a phantom member until MemberTimeout.
			n.sendHeartbeat(wire.Heartbeat_LEAVE, "")
			fctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = n.nc.FlushWithContext(fctx)
			cancel()
		}
		n.shutdown(ErrClosed)
		n.waitStarted()
		return nil, fmt.Errorf("pubsub: join %s: %w", n.self.ID, joinError(err))
	}
	if n.rpc, err = newRPC(nc); err != nil {
		return fail(err)
	}
	if n.life.inboxSub, err = nc.Subscribe(n.self.Inbox, n.onInbox); err != nil {
		return fail(err)
	}
	// The inbox carries every delivery to this node; NATS's default pending
	// limits would drop bursts, so they are raised deliberately.
	if err = n.life.inboxSub.SetPendingLimits(inboxPendingMsgs, inboxPendingBytes); err != nil {
		return fail(err)
	}
	if err = n.checkPermissions(ctx); err != nil {
		return fail(err)
	}
	// Before this node's own subscription there, which would make itself
	// the audience.
	audience, err := n.membersAudience(ctx)
	if err != nil {
		return fail(err)
	}
	if n.members.sub, err = nc.Subscribe(n.members.subject, n.onMembers); err != nil {
		return fail(err)
	}
	n.life.goroutines.add()
	go n.syncLoop()
	n.life.goroutines.add()
	go n.heartbeatLoop()
	if cfg.MetricsInterval > 0 {
		n.life.goroutines.add()
		go n.metricsLoop()
	}
	announced = true
	if err = n.joinView(ctx, audience); err != nil {
		return fail(err)
	}
	if err = n.checkMemberInboxes(ctx); err != nil {
		return fail(err)
	}
	if n.life.closed.Load() || nc.IsClosed() {
		// Stopped under Join, or its connection closed, after the checks
		// above passed: a stopped node is no node to return.
		return fail(fmt.Errorf("%w: the node stopped while joining, or its NATS connection closed", ErrClosed))
	}
	n.startQuorum()
	n.markJoined()
	n.log.Debug("joined", "members", len(n.view().members))
	return n, nil
}

const (
	inboxPendingMsgs  = 1 << 20
	inboxPendingBytes = 512 << 20
)

// Events returns the node's event stream.
func (n *Node) Events() *EventStream { return n.events }

// ID returns the node ID.
func (n *Node) ID() string { return n.self.ID }

// Close leaves the cluster gracefully: it announces the leave so peers re-own
// this node's topics at once, stops serving, ends local subscriptions with
// ErrClosed and waits, within ctx, for the node's goroutines (including
// running handlers). It does not close the *nats.Conn. If ctx ends first,
// Close still stops the node and returns an error wrapping ctx's error that
// says what it was waiting for: writing the merged AckNone publishes this
// node accepted (the error says how many were not written by then; those
// its flusher could not write either are lost, counted in
// Stats().Rejected), the drain (answering the batches it accepted as
// owner, handing its topics over) or the handlers. A second Close waits
// like the first, within its own ctx, and returns nil; once any Close
// returned nil, the node's ID may join again.
//
// A publish still waiting for its owner when Close is called fails with
// ErrTimeout: its subscribers may or may not have processed it.
//
// The drain answers the batches this node accepted as owner truthfully, so
// local subscriptions keep handling what they had queued of them, their
// handlers' ctx still live, for up to SubscriberTimeout; a subscription
// whose owner evicts it meanwhile (EvictAfter failures) ends with an error
// wrapping ErrClosed that names the failure, not ErrEvicted, though the
// owner still counts and reports the eviction (Stats().Evictions,
// SubscriberEvicted). For a prompt stop, Unsubscribe the subscriptions
// first, or give Close a ctx with a deadline.
//
// Close waits for running handlers, so a handler calling Close on its own
// node waits for itself: Close then returns only when ctx ends (at once
// with the handler's ctx, which Close cancels; never with
// context.Background). Close from another goroutine to wait for the
// handlers.
func (n *Node) Close(ctx context.Context) error {
	if !n.life.closeCalled.CompareAndSwap(false, true) {
		select {
		case <-n.life.closeDone:
			// The first Close may have given up on the handlers: wait too.
			if err := n.life.goroutines.wait(ctx); err != nil {
				return fmt.Errorf("pubsub: close %s: waiting for handlers: %w", n.self.ID, err)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("pubsub: close %s: waiting for the first Close: %w", n.self.ID, ctx.Err())
		}
	}
	defer close(n.life.closeDone)
	var drainErr error
	if !n.life.closed.Load() && !n.nc.IsClosed() {
		// Merged AckNone publishes were accepted: they leave while the
		// owners still serve this node.
		if err := n.flushOutboxes(ctx); err != nil {
			drainErr = fmt.Errorf("pubsub: close %s: %w", n.self.ID, err)
		}
		// The heartbeat loop stops first: a heartbeat sent after the LEAVE
		// would re-add this node on some peers and not on others.
		close(n.life.stopBeats)
		select {
		case <-n.life.beatsStopped:
		case <-ctx.Done():
		}
		if err := n.drainAndLeave(ctx); err != nil && drainErr == nil {
			drainErr = fmt.Errorf("pubsub: close %s: draining (answering the batches it accepted as owner, handing its topics over; its peers take the topics over without the handover): %w", n.self.ID, err)
		}
	}
	n.shutdown(ErrClosed)
	err := n.life.goroutines.wait(ctx)
	switch {
	case drainErr != nil:
		return drainErr
	case err != nil:
		return fmt.Errorf("pubsub: close %s: waiting for handlers: %w", n.self.ID, err)
	}
	return nil
}

// waitStarted waits a bounded time for the goroutines of a node whose Join
// failed: nothing of a failed Join may outlive it.
func (n *Node) waitStarted() {
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.RequestTimeout)
	defer cancel()
	_ = n.life.goroutines.wait(ctx)
}

// connectionLost stops a node whose NATS connection was closed underneath
// it: without a connection it can neither serve nor be reached, and a node
// that carried on would accept publishes it cannot deliver.
func (n *Node) connectionLost() {
	if !n.life.closed.CompareAndSwap(false, true) {
		return
	}
	err := fmt.Errorf("pubsub: node %s stopped: its NATS connection was closed: %w", n.self.ID, ErrClosed)
	n.log.Error("NATS connection closed: node stopped; Join again with a new connection", "err", err)
	// closed is already set, so calls fail from the moment a listener can
	// see the event; shutdown closes the stream after it.
	emit(n.events, NodeStopped{Err: err})
	n.shutdown(err)
}

// shutdown releases everything the node started; it never blocks. Local
// subscriptions end with reason, which wraps ErrClosed.
func (n *Node) shutdown(reason error) {
	n.life.closeOnce.Do(func() {
		n.life.closed.Store(true)
		for _, s := range []*nats.Subscription{n.life.inboxSub, n.members.sub} {
			if s != nil {
				_ = s.Unsubscribe()
			}
		}
		n.life.cancel()
		if n.rpc != nil {
			n.rpc.close()
		}
		for _, s := range n.subscriber.takeAll() {
			s.end(reason)
		}
		n.owner.forgetMarks()
		n.events.close()
	})
}

// onInbox dispatches a message on this node's inbox. It runs on the inbox
// subscription's goroutine and never blocks: work goes to actors.
func (n *Node) onInbox(m *nats.Msg) {
	var env wire.Envelope
	if err := wire.Decode(m.Data, &env); err != nil {
		n.malformed("inbox", len(m.Data))
		n.replyTo(m.Reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "malformed envelope"})
		return
	}
	if n.meantForNewer(toIncarnation(&env)) {
		// Before the closed and drain checks: an older incarnation that
		// is closing answered CLOSED, which the sender takes for the
		// newer one's answer (its subscribers gone, a publish it served
		// retried).
		return
	}
	publish, isPublish := env.Body.(*wire.Envelope_Publish)
	if isPublish {
		// Counted before the drain check (see ownerSide.queued): a
		// draining Close that saw no count sees drain.on set here.
		n.owner.queued.Add(1)
	}
	if n.life.closed.Load() || n.life.drain.on.Load() {
		if isPublish {
			n.owner.queued.Add(-1)
		}
		if n.life.closed.Load() {
			n.replyTo(m.Reply, &wire.Reply{Code: wire.Reply_CLOSED})
		} else {
			n.onInboxDraining(&env, m.Reply)
		}
		return
	}
	if isPublish {
		if !n.onPublishRequest(publish.Publish, m.Reply) {
			n.owner.queued.Add(-1)
		}
		return
	}
	switch b := env.Body.(type) {
	case *wire.Envelope_Deliver:
		n.onDeliver(b.Deliver, m.Reply)
	case *wire.Envelope_Subscribe:
		n.onSubscribeRequest(b.Subscribe, m.Reply)
	case *wire.Envelope_Sync:
		n.onSync(b.Sync, m.Reply)
	case *wire.Envelope_SyncRequest:
		n.onSyncRequest(b.SyncRequest, m.Reply)
	case *wire.Envelope_Evict:
		n.onEvict(b.Evict, m.Reply)
	case *wire.Envelope_Topics:
		n.onTopicsRequest(b.Topics, m.Reply)
	case *wire.Envelope_Heartbeat:
		n.onReplacedNotice(b.Heartbeat)
	default:
		n.malformed("inbox", len(m.Data))
		n.replyTo(m.Reply, &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "unexpected message"})
	}
}

// malformed counts a message that failed to decode. Anyone with publish
// rights on our subjects can send garbage; it must cost nothing else.
func (n *Node) malformed(where string, size int) {
	n.stats.malformed.Add(1)
	n.log.Debug("dropped malformed message", "subject", where, "bytes", size)
}

// group counts goroutines the node started, so Close can wait for them.
// Unlike sync.WaitGroup it allows add after wait started.
type group struct {
	mu   sync.Mutex
	n    int
	zero chan struct{}
}

func (g *group) add() {
	g.mu.Lock()
	g.n++
	g.mu.Unlock()
}

func (g *group) done() {
	g.mu.Lock()
	g.n--
	if g.n == 0 && g.zero != nil {
		close(g.zero)
		g.zero = nil
	}
	g.mu.Unlock()
}

func (g *group) wait(ctx context.Context) error {
	g.mu.Lock()
	if g.n == 0 {
		g.mu.Unlock()
		return nil
	}
	if g.zero == nil {
		g.zero = make(chan struct{})
	}
	ch := g.zero
	g.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// sentinels are the package's sentinel errors, which every error it
// returns wraps (or a context error).
var sentinels = []error{ErrQueueFull, ErrTimeout, ErrClosed, ErrTooLarge, ErrInvalidTopic,
	ErrTopicUnavailable, ErrEvicted, ErrInvalidConfig, ErrInvalidMessage, ErrTooManySubscriptions, context.Canceled, context.DeadlineExceeded}

// joinError gives a failure of Join its sentinel. Join's own checks
// already wrap one (or are ctx's); what NATS itself returns while Join
// subscribes and flushes says the connection cannot be used (closed,
// draining, without servers): ErrClosed, or ErrTimeout when it did not
// answer in time.
func joinError(err error) error {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return err
		}
	}
	if errors.Is(err, nats.ErrTimeout) {
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	}
	return fmt.Errorf("%w: the NATS connection cannot be used: %w", ErrClosed, err)
}
