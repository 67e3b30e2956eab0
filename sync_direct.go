package pubsub

// directRequests are the subscribe and unsubscribe requests (and pushed
// syncs, and evictions) topic actors applied while the registry may still
// hand them members' answers: before they took their view's syncs, or
// while the registry collects answers again. A member's answer to a pull
// is a snapshot: taken before such a request, it would undo it when the
// actor merges it (an Unsubscribe brought back, its subscriber then
// evicted as gone), and an actor cleared by a view change before it took
// its syncs (a gained topic not ready yet) would lose the request
// altogether (a Subscribe answered OK, then never served). take applies
// them on top of the answers.
//
// Each request is stamped. A member's answer to a pull sent at stamp s
// covers its subscribe requests stamped up to s (a node registers a
// subscription locally before it asks the owner), so those are forgotten
// when it is recorded, not the ones that arrived while the member
// answered. Removals are kept until taken: an eviction is recorded here
// before the member hears of it, so its answer may still list the
// subscriber; and a node never names a new subscription as an old one, so
// a removal held longer cannot hit a live subscriber.
//
// Guarded by syncRegistry.mu. Bounded per node by maxSubscriptions, which
// no member's own subscriptions exceed: past it a new request is dropped,
// counted (Malformed) and logged.
type directRequests struct {
	byTopic map[string]map[string]map[string]directEntry // topic -> node -> local
	nodes   map[string]directNode
	clock   uint64 // the last stamp given
}

type directEntry struct {
	subscribed bool
	stamp      uint64
}

type directNode struct {
	inc     uint64 // the incarnation whose requests are held
	entries int
}

// record notes that from (in its incarnation) subscribed local to topic,
// or unsubscribed it; the latest request for a subscriber wins. It reports
// false when the node holds too many already.
func (d *directRequests) record(topic string, from Member, local string, subscribed bool) bool {
	if d.byTopic == nil {
		d.byTopic = map[string]map[string]map[string]directEntry{}
		d.nodes = map[string]directNode{}
	}
	if dn, ok := d.nodes[from.ID]; ok && dn.inc != from.Incarnation {
		if from.Incarnation < dn.inc {
			return true // a late eviction of a previous life: nothing to keep
		}
		d.dropNode(from.ID) // requests of its previous life are void
	}
	dn := d.nodes[from.ID]
	locals := d.byTopic[topic][from.ID]
	if _, ok := locals[local]; !ok {
		if dn.entries >= maxSubscriptions {
			return false
		}
		dn.entries++
	}
	if locals == nil {
		byNode := d.byTopic[topic]
		if byNode == nil {
			byNode = map[string]map[string]directEntry{}
			d.byTopic[topic] = byNode
		}
		locals = map[string]directEntry{}
		byNode[from.ID] = locals
	}
	d.clock++
	locals[local] = directEntry{subscribed: subscribed, stamp: d.clock}
	d.nodes[from.ID] = directNode{inc: from.Incarnation, entries: dn.entries}
	return true
}

// forget drops the request held for one subscriber, if any: a later one
// reached the actor itself, with nothing left to apply it over.
func (d *directRequests) forget(topic, node, local string) {
	locals := d.byTopic[topic][node]
	if _, ok := locals[local]; !ok {
		return
	}
	delete(locals, local)
	d.cleanup(topic, node, 1)
}

// stamp is the current stamp: requests recorded later are not covered by
// an answer to a pull sent now.
func (d *directRequests) stamp() uint64 { return d.clock }

// answered forgets node's subscribe requests an answer to a pull sent at
// stamp since covers.
func (d *directRequests) answered(node string, since uint64) {
	if _, ok := d.nodes[node]; !ok {
		return
	}
	for t, byNode := range d.byTopic {
		locals := byNode[node]
		k := 0
		for l, e := range locals {
			if e.subscribed && e.stamp <= since {
				delete(locals, l)
				k++
			}
		}
		if k > 0 {
			d.cleanup(t, node, k)
		}
	}
}

// dropNode forgets node's requests: it left the view, or came back as
// another incarnation.
func (d *directRequests) dropNode(node string) {
	if _, ok := d.nodes[node]; !ok {
		return
	}
	for t, byNode := range d.byTopic {
		delete(byNode, node)
		if len(byNode) == 0 {
			delete(d.byTopic, t)
		}
	}
	delete(d.nodes, node)
}

// retain keeps, for view v, the requests of topics self owns by members v
// holds in the same incarnation.
func (d *directRequests) retain(v *view, self string) {
	for t := range d.byTopic {
		if v.ownerOf(t).ID != self {
			d.dropTopic(t)
		}
	}
	for id, dn := range d.nodes {
		if !v.holds(Member{ID: id, Incarnation: dn.inc}) {
			d.dropNode(id)
		}
	}
}

// dropTopic forgets topic's requests (it moved away).
func (d *directRequests) dropTopic(topic string) {
	for node, locals := range d.byTopic[topic] {
		d.uncount(node, len(locals))
	}
	delete(d.byTopic, topic)
}

// cleanup removes emptied maps after k of node's entries for topic were
// deleted.
func (d *directRequests) cleanup(topic, node string, k int) {
	byNode := d.byTopic[topic]
	if len(byNode[node]) == 0 {
		delete(byNode, node)
		if len(byNode) == 0 {
			delete(d.byTopic, topic)
		}
	}
	d.uncount(node, k)
}

func (d *directRequests) uncount(node string, k int) {
	dn := d.nodes[node]
	if dn.entries -= k; dn.entries <= 0 {
		delete(d.nodes, node)
		return
	}
	d.nodes[node] = dn
}

// applyTo applies topic's requests to the synced subscribers byNode (node
// -> subscribers; nil for none), forgets them and returns the result.
// Requests of a node that is not in v under the same incarnation are void.
func (d *directRequests) applyTo(topic string, byNode map[string]map[string]struct{}, v *view) map[string]map[string]struct{} {
	for node, locals := range d.byTopic[topic] {
		inc := d.nodes[node].inc // read before uncount may delete it
		d.uncount(node, len(locals))
		if m, ok := v.member(node); !ok || m.Incarnation != inc {
			continue
		}
		for local, e := range locals {
			set := byNode[node]
			switch {
			case e.subscribed && set == nil:
				if byNode == nil {
					byNode = map[string]map[string]struct{}{}
				}
				byNode[node] = map[string]struct{}{local: {}}
			case e.subscribed:
				set[local] = struct{}{}
			default:
				delete(set, local)
			}
		}
	}
	delete(d.byTopic, topic)
	return byNode
}
