package pubsub

// directRequests are the subscribe and unsubscribe requests (and pushed
// syncs) topic actors applied before they took their view's syncs from the
// registry. A member's answer to a pull is a snapshot: taken before such a
// request, it would undo it when the actor merges it (an Unsubscribe
// brought back, its subscriber then evicted as gone), and an actor cleared
// by a view change before it took its syncs (a gained topic not ready yet)
// would lose the request altogether (a Subscribe answered OK, then never
// served). take applies them on top of the answers; a member's next answer
// covers its requests and replaces them.
//
// Guarded by syncRegistry.mu. Bounded per node by maxSubscriptions, which
// no member's own subscriptions exceed; past it the oldest topic is not
// told apart from the rest: the request is dropped, counted and logged.
type directRequests struct {
	byTopic map[string]map[string]map[string]bool // topic -> node -> local -> subscribed
	nodes   map[string]directNode
}

type directNode struct {
	inc     uint64 // the incarnation whose requests are held
	entries int
}

// record notes that node (incarnation inc) subscribed local to topic, or
// unsubscribed it. It reports false when the node holds too many already.
func (d *directRequests) record(topic string, from Member, local string, subscribed bool) bool {
	if d.byTopic == nil {
		d.byTopic = map[string]map[string]map[string]bool{}
		d.nodes = map[string]directNode{}
	}
	if dn, ok := d.nodes[from.ID]; ok && dn.inc != from.Incarnation {
		d.dropNode(from.ID) // requests of its previous life are void
	}
	dn := d.nodes[from.ID]
	byNode := d.byTopic[topic]
	if byNode == nil {
		byNode = map[string]map[string]bool{}
		d.byTopic[topic] = byNode
	}
	locals := byNode[from.ID]
	if locals == nil {
		locals = map[string]bool{}
		byNode[from.ID] = locals
	}
	if _, ok := locals[local]; !ok {
		if dn.entries >= maxSubscriptions {
			if len(locals) == 0 {
				delete(byNode, from.ID)
			}
			if len(byNode) == 0 {
				delete(d.byTopic, topic)
			}
			return false
		}
		dn.entries++
	}
	locals[local] = subscribed
	d.nodes[from.ID] = directNode{inc: from.Incarnation, entries: dn.entries}
	return true
}

// dropNode forgets node's requests: it answered again (its answer covers
// them), or left the view.
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

// dropTopic forgets topic's requests (it moved away).
func (d *directRequests) dropTopic(topic string) {
	for node, locals := range d.byTopic[topic] {
		d.uncount(node, len(locals))
	}
	delete(d.byTopic, topic)
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
		d.uncount(node, len(locals))
		m, ok := v.member(node)
		if !ok || m.Incarnation != d.incOf(node, m.Incarnation) {
			continue
		}
		for local, subscribed := range locals {
			set := byNode[node]
			switch {
			case subscribed && set == nil:
				if byNode == nil {
					byNode = map[string]map[string]struct{}{}
				}
				byNode[node] = map[string]struct{}{local: {}}
			case subscribed:
				set[local] = struct{}{}
			default:
				delete(set, local)
			}
		}
	}
	delete(d.byTopic, topic)
	return byNode
}

// incOf is the incarnation node's requests were made by; def when the
// node's count was just dropped to zero by applyTo (its last topic).
func (d *directRequests) incOf(node string, def uint64) uint64 {
	if dn, ok := d.nodes[node]; ok {
		return dn.inc
	}
	return def
}
