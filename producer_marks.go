package pubsub

import "sync/atomic"

// Producer marks: what a node remembers per producer to keep a producer's
// batches in order. Each topic actor remembers the last batch it accepted
// of each producer (topicActor.producers, producerServed) and each
// subscription the last batch it ran (Subscription.producers and
// .rerouted, handle). Each map holds at most maxTrackedProducers, but a
// node with thousands of topics and short-lived (or forged) producers
// would hold thousands of such maps full: the node's budget bounds them
// together.

// maxNodeProducerMarks bounds the marks one node's maps hold together,
// beyond the producerMarksFloor each map may always hold. An entry costs
// at most about 300 bytes (a subscription's 56-byte slot with the map's
// overhead, and a producer ID of up to maxProducerIDLen bytes; about 70
// to 150 bytes with a BatchingProducer's 16-digit ID), so the budget is
// at most about 40 MB. Where the per-map bound alone let 10 000 topics
// hold 2 x 10 000 x 4 096 marks (gigabytes), the node now holds at most
// maxNodeProducerMarks + producerMarksFloor x maps: with 10 000 topics,
// each with its actor and a subscription here, 131 072 + 160 000 (a group
// member's subscription that ran re-routed shares has a second map,
// rerouted: up to 131 072 + 240 000).
const maxNodeProducerMarks = 1 << 17

// producerMarksFloor is what a map may always hold, past the node's
// budget too: every topic keeps order for a few producers however many
// other topics fill the budget. Its share of the bound grows with the
// maps, which cost memory of their own anyway.
const producerMarksFloor = 8

// markBudget counts the producer marks a node's maps hold.
type markBudget struct {
	held  atomic.Int64
	limit atomic.Int64 // maxNodeProducerMarks; 0: unbounded (a Node built by a test)
}

// producerMarks is one map of producer marks counted against its node's
// budget. It is touched only by the work of its actor or mailbox.
type producerMarks[V any] struct {
	m map[string]V
}

// get returns producer's mark.
func (p *producerMarks[V]) get(producer string) (V, bool) {
	v, ok := p.m[producer]
	return v, ok
}

// put records v as producer's mark. A known producer's is replaced, at the
// cost of the map write alone. A new one takes a place in the node's
// budget; past maxTrackedProducers, or past the node's budget when the map
// holds producerMarksFloor already, the map forgets an arbitrary other
// producer's mark first. Only that producer's protection is lost, against
// a batch older than its newest: at an owner, at worst one batch of it
// waits for its predecessor to settle (ORDER_WAIT); at a subscription, a
// late batch of it is run rather than dropped. Every producer and node
// incarnation ever seen would otherwise stay.
func (p *producerMarks[V]) put(n *Node, producer string, v V) {
	if _, known := p.m[producer]; known {
		p.m[producer] = v
		return
	}
	if p.m == nil {
		p.m = make(map[string]V)
	}
	if len(p.m) >= maxTrackedProducers {
		p.forgetOne() // the map's own bound: the node's count stays
		n.stats.marksForgotten.Add(1)
	} else if limit := n.marks.limit.Load(); n.marks.held.Add(1) > limit && limit > 0 && len(p.m) >= producerMarksFloor {
		// Counted first, so maps adding at once cannot all pass the
		// check: past the budget, only a map under the floor grows.
		n.marks.held.Add(-1)
		p.forgetOne()
		n.stats.marksForgotten.Add(1)
		if ok, held := n.log.limit.allow("producers/budget"); ok {
			n.log.Warn("producer marks at the node's budget: forgetting one to remember another (that producer loses its protection against a late batch)",
				"limit", limit, "suppressed", held)
		}
	}
	p.m[producer] = v
}

// forgotMark counts a mark one of the smaller maps kept per producer or
// per split batch forgot to stay within its own bound (which, a throttle
// key, names it): a group's round-robin starts (maxRRStarts), a group
// member's refused shares (maxRefusedProducers), a subscription's split
// marks (maxTrackedSplits). Each costs one producer's retry or late chunk
// the check that map made; logged at debug level, throttled.
func (n *Node) forgotMark(which string) {
	n.stats.marksForgotten.Add(1)
	if ok, held := n.log.limit.allow(which); ok {
		n.log.Debug("forgot a producer's mark to stay within its map's bound (a retry or late chunk of that producer loses its check)",
			"map", which, "suppressed", held)
	}
}

// forgetOne forgets an arbitrary mark.
func (p *producerMarks[V]) forgetOne() {
	for k := range p.m {
		delete(p.m, k)
		return
	}
}

// forgetAll drops the map and gives its marks back to the node's budget:
// its actor was collected, its subscription ended, its node closed.
func (p *producerMarks[V]) forgetAll(n *Node) {
	n.marks.held.Add(-int64(len(p.m)))
	p.m = nil
}
