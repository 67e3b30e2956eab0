package pubsub

import "sync/atomic"

// Stats are a node's figures since it joined.
type Stats struct {
	Members           int    // members in the current view
	TopicsOwned       int    // topics this node owns and serves
	Subscriptions     int    // local subscriptions
	MessagesPublished uint64 // messages accepted by this node as owner
	Deliveries        uint64 // subscriber deliveries that succeeded (owner side)
	DeliveryFailures  uint64 // subscriber deliveries that failed (owner side)
	Evictions         uint64 // subscribers this node evicted as owner
	Malformed         uint64 // malformed messages dropped
	InboxDropped      uint64 // inbox messages NATS dropped (slow consumer)
}

type nodeStats struct {
	published, delivered, failed, evicted, malformed, inboxDropped atomic.Uint64
}

// Stats returns the node's current figures.
func (n *Node) Stats() Stats {
	st := Stats{
		Members:           len(n.view().members),
		MessagesPublished: n.stats.published.Load(),
		Deliveries:        n.stats.delivered.Load(),
		DeliveryFailures:  n.stats.failed.Load(),
		Evictions:         n.stats.evicted.Load(),
		Malformed:         n.stats.malformed.Load(),
		InboxDropped:      n.stats.inboxDropped.Load(),
	}
	v := n.view()
	n.topicsMu.Lock()
	for t := range n.topics {
		if v.ownerOf(t).ID == n.id {
			st.TopicsOwned++
		}
	}
	n.topicsMu.Unlock()
	n.subsMu.RLock()
	st.Subscriptions = len(n.subs)
	n.subsMu.RUnlock()
	return st
}
