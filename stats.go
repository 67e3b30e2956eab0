package pubsub

import (
	"context"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Stats are a node's figures. Counters count since the node joined.
type Stats struct {
	Members           int                       // members in the current view
	TopicsOwned       int                       // topics this node owns and holds state for
	Subscribers       map[string]int            // subscribers per owned topic (owner side)
	Groups            map[string]map[string]int // members per consumer group, per owned topic with groups (owner side)
	Subscriptions     int                       // local subscriptions
	MaxMailboxDepth   int                       // deepest local mailbox, in batches
	MessagesPublished uint64                    // messages accepted by this node as owner
	Deliveries        uint64                    // subscriber deliveries that succeeded (owner side)
	DeliveryFailures  uint64                    // subscriber deliveries that failed (owner side)
	Rejected          uint64                    // messages this node rejected as publisher, per call or attempt (a producer's retried attempt counts each time)
	Evictions         uint64                    // subscribers this node evicted as owner
	Malformed         uint64                    // malformed messages dropped
	InboxDropped      uint64                    // messages NATS dropped (slow consumer) on the node's inbox, reply and membership subscriptions
	MembersRejected   uint64                    // heartbeats ignored past MaxMembers
	// MembersForgotten counts records of past members forgotten to stay
	// within MaxMembers of each kind (each logged, throttled): a graceful
	// leave forgotten lets that member's late heartbeats add it back
	// until MemberTimeout; a timed-out member forgotten is not told if a
	// newer incarnation replaced it (see the README's failure model).
	MembersForgotten uint64
	// SettingsMismatches counts peers heard running a PartitionPolicy
	// other than this node's, or heartbeating too seldom for its
	// MemberTimeout (more than half of it apart): once per change of what
	// a peer says; each is logged (throttled).
	SettingsMismatches uint64
	RequestsRefused    uint64 // requests refused: their topic actor's queue was full, or the batches this node accepted as owner and has not settled were over budget (256 MiB), or its subscriber records as owner were at their bound (1 048 576; records from a gained topic's syncs count one each), or (subscriber side) 64 copies of one at-least-once batch already waited for its report
	AckNoneRefused     uint64 // messages of AckNone publishes this node refused as owner, its own included (not the owner, not ready, held back for a producer's order, queue full): lost, and nobody tells their publisher
	// AnsweredEarly counts AckDelivered batches this node, as owner,
	// answered at their publisher's deadline (a ctx deadline, or timeouts
	// on the publishing node shorter than this one's), before every
	// subscriber had reported: the ack lists those as Timeout.
	AnsweredEarly uint64
	SyncRequests  uint64 // handoff requests this node answered (owners asking for its subscriptions, or for a handover)
	EventsDropped uint64 // events lost by EventStream listeners that fell behind, summed over listeners (each is told by an EventsDropped once it returns; the node logs it, throttled)
	// ProducerMarks is the number of producers this node's topic actors
	// and subscriptions remember, to keep each producer's batches in
	// order: at most 131 072 for the node, plus 8 per topic actor and per
	// subscription (16 for a group member that ran re-routed shares: it
	// keeps those in a second map). ProducerMarksForgotten counts the marks forgotten to
	// stay within that, or within 4 096 per actor or subscription: each
	// costs one producer its protection against a late batch of its own
	// (logged, throttled, when the node's budget is the cause). It also
	// counts what the smaller maps kept per producer or split batch forgot
	// past their bounds (a group's round-robin starts, a group member's
	// refused shares, 256 producers each; a subscription's split-batch
	// marks, 64), logged at debug level: a retry of that producer's batch
	// is assigned or refused anew, a late chunk is not checked.
	ProducerMarks          int
	ProducerMarksForgotten uint64
	// KeptCopyHits counts deliveries to this node's subscribers of
	// batches this node published through a remote owner that came
	// without their messages, taken from the copy this node kept (a
	// publisher with subscribers to the topic keeps one, so the batch
	// does not cross the servers back). KeptCopyMisses counts those that
	// found no copy (held up past the copy's 2 minutes, or an
	// at-least-once copy arriving after the publish was answered): the
	// owner then sent the messages, at the cost of a round trip, if it
	// still waited for the delivery (each miss is logged, throttled).
	// Past 16 MiB or 1 024 copies a node keeps none and its requests
	// name none: KeptCopySkipped counts those requests (each logged,
	// throttled). Nothing is lost; their messages cross the servers back.
	KeptCopyHits, KeptCopyMisses, KeptCopySkipped uint64
	// Under KeepMajority: whether this node sees a majority of the last
	// stable view and so serves the topics it owns (always true under
	// KeepServing), and that view's agreed epoch and size (0 under
	// KeepServing).
	HasQuorum     bool
	StableEpoch   uint64
	StableMembers int
}

type nodeStats struct {
	published, delivered, failed, rejected, evicted, malformed, inboxDropped, membersRejected, membersForgotten, refused, ackNoneRefused, answeredEarly, syncRequests, settingsMismatches, marksForgotten atomic.Uint64
}

// Stats returns the node's current figures. It takes a few locks but never
// waits for an actor, so it is cheap enough to poll.
func (n *Node) Stats() Stats {
	st := Stats{
		Members:                len(n.view().members),
		Subscribers:            map[string]int{},
		MessagesPublished:      n.stats.published.Load(),
		Deliveries:             n.stats.delivered.Load(),
		DeliveryFailures:       n.stats.failed.Load(),
		Rejected:               n.stats.rejected.Load(),
		Evictions:              n.stats.evicted.Load(),
		Malformed:              n.stats.malformed.Load(),
		InboxDropped:           n.stats.inboxDropped.Load(),
		MembersRejected:        n.stats.membersRejected.Load(),
		MembersForgotten:       n.stats.membersForgotten.Load(),
		SettingsMismatches:     n.stats.settingsMismatches.Load(),
		RequestsRefused:        n.stats.refused.Load(),
		AckNoneRefused:         n.stats.ackNoneRefused.Load(),
		AnsweredEarly:          n.stats.answeredEarly.Load(),
		SyncRequests:           n.stats.syncRequests.Load(),
		EventsDropped:          n.events.dropped.Load(),
		ProducerMarks:          int(n.marks.held.Load()),
		ProducerMarksForgotten: n.stats.marksForgotten.Load(),
		KeptCopyHits:           n.publisher.kept.hits.Load(),
		KeptCopyMisses:         n.publisher.kept.misses.Load(),
		KeptCopySkipped:        n.publisher.kept.skipped.Load(),
	}
	st.HasQuorum = true // KeepServing always serves
	if n.cfg.PartitionPolicy == KeepMajority {
		// Under the lock a view change holds until its quorum is re-evaluated:
		// the figures agree with Members() read before.
		n.members.mu.Lock()
		q := &n.members.quorum
		st.HasQuorum = q.has.Load()
		if q.stable != nil {
			st.StableEpoch, st.StableMembers = q.epoch, len(q.stable.members)
		}
		n.members.mu.Unlock()
	}
	v := n.view()
	n.owner.mu.Lock()
	for t, a := range n.owner.topics {
		if v.ownerOf(t).ID == n.self.ID {
			st.TopicsOwned++
			st.Subscribers[t] = int(a.count.Load())
			if g := a.groupSizes.Load(); g != nil && len(*g) > 0 {
				if st.Groups == nil {
					st.Groups = map[string]map[string]int{}
				}
				st.Groups[t] = maps.Clone(*g)
			}
		}
	}
	n.owner.mu.Unlock()
	n.subscriber.each(func(_ string, s *Subscription) {
		st.Subscriptions++
		st.MaxMailboxDepth = max(st.MaxMailboxDepth, s.mailbox.depth())
	})
	return st
}

// metricsLoop emits a MetricsSnapshot every MetricsInterval while anyone listens.
func (n *Node) metricsLoop() {
	defer n.life.goroutines.done()
	t := time.NewTicker(n.cfg.MetricsInterval)
	defer t.Stop()
	for {
		select {
		case <-n.life.ctx.Done():
			return
		case <-t.C:
			if n.events.enabled() {
				emit(n.events, MetricsSnapshot{Stats: n.Stats()})
			}
		}
	}
}

// TopicStats describes one topic as its owner sees it.
type TopicStats struct {
	Topic       string
	Owner       string         // the owner's node ID
	Subscribers map[string]int // subscribers per node ID
	Total       int            // all subscribers
	Groups      map[string]int // members per consumer group; nil without groups
}

// TopicStats asks the topic's owner for its subscriber counts, following
// ownership changes as a publish does. It fails with ErrInvalidTopic,
// ErrTopicUnavailable (no owner served the topic within RequestTimeout or
// before ctx ended), ErrQueueFull (the owner's queue for the topic stayed
// full as long), ErrTimeout (the owner did not answer in time), ctx's
// error, or ErrClosed once the node closed.
func (n *Node) TopicStats(ctx context.Context, topic string) (TopicStats, error) {
	if err := validateTopic(topic); err != nil {
		return TopicStats{}, err
	}
	req := &wire.SubscribeRequest{From: n.selfRef(), Topic: topic, Stats: true}
	ans, err := n.toOwner(ctx, topic, subscribeRequest{req}, ownerCall{})
	if err != nil {
		return TopicStats{}, fmt.Errorf("pubsub: stats of %q: %w", topic, err)
	}
	ts := TopicStats{Topic: topic, Owner: ans.owner, Subscribers: ans.counts, Groups: ans.groups}
	for _, c := range ans.counts {
		ts.Total += c
	}
	return ts, nil
}

// stats answers a TopicStats request on the owner.
func (a *topicActor) stats(answer func(ownerAnswer)) {
	v, code := a.check()
	ans := ownerAnswer{code: code, viewID: v.id, owner: a.n.self.ID}
	if code == wire.Reply_OK {
		ans.counts = make(map[string]int, len(a.nodes))
		for node, ns := range a.nodes {
			ans.counts[node] = len(ns.set)
		}
		if len(a.groups.sizes) > 0 {
			ans.groups = maps.Clone(a.groups.sizes)
		}
	}
	answer(ans)
}
