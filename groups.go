package pubsub

import (
	"maps"
	"slices"
	"strings"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Consumer groups, owner side. A group member's SubscriberID.Local ends
// with groupMark and the group's name, so the group travels with the ID
// through subscribe requests, syncs and handovers unchanged. For each batch
// the topic actor assigns every message to one member of each group and
// sends each node, in its one delivery, the broadcast subscribers' full
// batch and each member's share (wire.Share: message indices).

const groupMark = "@"

// groupOf returns the group named in a subscriber's local ID, or "".
func groupOf(local string) string {
	if i := strings.Index(local, groupMark); i >= 0 {
		return local[i+len(groupMark):]
	}
	return ""
}

// share is one group member's part of a batch on its node.
type share struct {
	local string
	idx   []uint32 // indices of the batch's messages, increasing
}

// fanoutPlan is a topic's subscribers arranged for fan-out. The actor keeps
// it across changes of its subscriber set and rebuilds only what a change
// touched: the broadcast lists, or one group's route (whose key slots cost
// 4 096 rankings over its members to rebuild).
type fanoutPlan struct {
	broadcast map[string][]string // node -> subscribers without a group, sorted; nil: to rebuild
	groups    []*groupRoute       // by name
	stale     bool                // a group may lack its route: rebuild the missing ones
}

// groupRoute chooses a group's member for each message.
type groupRoute struct {
	name    string
	members []SubscriberID // sorted by String
	keys    []uint64       // rendezvous key of each member
	slots   []uint32       // slot -> member index; built on the first keyed message
	next    int            // round-robin position for messages without a key
	// starts: where round robin started for each producer's last
	// batches (oldest first, at most maxRRBatches), so a retry of one (an
	// unknown outcome) gets the shares it had. More than the last: a
	// pipelined producer retries a batch after later ones were assigned,
	// and a split batch's retry starts again at its first chunk.
	starts map[string][]rrStart
}

// rrStart is the round-robin position a producer's batch started at.
type rrStart struct {
	seq   uint64
	start int
}

// maxRRStarts bounds groupRoute.starts; past it one producer's are
// forgotten, and a retry of one of its batches is assigned anew.
const maxRRStarts = 256

// maxRRBatches is how many batches (chunks of a split batch counting
// each) groupRoute.starts remembers per producer: 4 in flight
// (DefaultMaxInFlight) split in up to 4 chunks each. A retry of an older
// one is assigned anew.
const maxRRBatches = 4 * DefaultMaxInFlight

// keySlots is the number of slots keys hash to: a keyed message goes to the
// member ranking highest for its slot (rendezvous hashing over the members),
// so per batch a group costs O(messages + members), and a member joining or
// leaving moves only its share of the slots.
const keySlots = 4096

func newGroupRoute(name string, members []SubscriberID) *groupRoute {
	slices.SortFunc(members, func(a, b SubscriberID) int { return strings.Compare(a.String(), b.String()) })
	g := &groupRoute{name: name, members: members, keys: make([]uint64, len(members))}
	for i, m := range members {
		g.keys[i] = mix64(fnvString(fnvString(fnvOffset, m.Node), "/"+m.Local))
	}
	return g
}

// forKey returns the index of the member that gets messages with key.
func (g *groupRoute) forKey(key string) int {
	if g.slots == nil {
		g.slots = make([]uint32, keySlots)
		for s := range g.slots {
			g.slots[s] = uint32(g.rank(uint64(s), nil))
		}
	}
	return int(g.slots[slotOf(key)])
}

func slotOf(key string) uint64 { return mix64(fnvString(fnvOffset, key)) % keySlots }

// rank returns the member ranking highest for slot, skipping excluded ones
// (-1 when none is left).
func (g *groupRoute) rank(slot uint64, excluded func(int) bool) int {
	s := mix64(slot ^ 0x9e3779b97f4a7c15)
	best, bestH := -1, uint64(0)
	for i, k := range g.keys {
		if excluded != nil && excluded(i) {
			continue
		}
		if h := mix64(s ^ k); best < 0 || h > bestH {
			best, bestH = i, h
		}
	}
	return best
}

// plan returns the actor's fan-out plan, rebuilding what a change of its
// subscriber set made stale.
func (a *topicActor) plan() *fanoutPlan {
	p := a.groups.plan
	if p == nil {
		p = &fanoutPlan{stale: true}
		a.groups.plan = p
	}
	if p.broadcast != nil && !p.stale {
		return p
	}
	rebuildBroadcast := p.broadcast == nil
	if rebuildBroadcast {
		p.broadcast = map[string][]string{}
	}
	var routed map[string]bool
	byGroup := map[string][]SubscriberID{}
	if p.stale {
		routed = make(map[string]bool, len(p.groups))
		for _, g := range p.groups {
			routed[g.name] = true
		}
	}
	for node, ns := range a.nodes {
		for _, l := range ns.locals() {
			if g := groupOf(l); g == "" {
				if rebuildBroadcast {
					p.broadcast[node] = append(p.broadcast[node], l)
				}
			} else if p.stale && !routed[g] {
				byGroup[g] = append(byGroup[g], SubscriberID{Node: node, Local: l})
			}
		}
	}
	if p.stale {
		for name, members := range byGroup {
			g := newGroupRoute(name, members)
			g.next = a.groups.next[name] % len(g.members) // carried over from the previous route
			p.groups = append(p.groups, g)
		}
		slices.SortFunc(p.groups, func(x, y *groupRoute) int { return strings.Compare(x.name, y.name) })
		p.stale = false
	}
	return p
}

// assign gives each of count messages (with keys, nil when none has one)
// to one member of each group and returns the shares by node. A batch of
// origin's producer seen before (a retry after an unknown outcome: its
// first attempt may have run) is assigned as it was, so each member gets
// the share it may have run, and answers it with its outcome instead of
// running messages another member ran; a member that got none of it the
// first time and some now would run them on an at-most-once topic.
// Keyed messages are assigned the same way anyway while the group is
// unchanged. replayed names the groups the batch was seen by before (nil
// when none): their members' answers to it may stand for an earlier
// attempt's runs (reroutes.reroutable). A producer a group forgot to
// remember origin's is counted on n (nil in unit tests).
func (p *fanoutPlan) assign(count int, keys []string, origin batchOrigin, n *Node) (out map[string][]share, replayed map[string]bool) {
	out = map[string][]share{}
	for _, g := range p.groups {
		byMember := make([][]uint32, len(g.members))
		pos, replay, forgotOne := g.rrStart(origin)
		if forgotOne && n != nil {
			n.forgotMark("producers/rr-starts")
		}
		if replay {
			if replayed == nil {
				replayed = map[string]bool{}
			}
			replayed[g.name] = true
		}
		for i := range count {
			var m int
			if keys != nil && keys[i] != "" {
				m = g.forKey(keys[i])
			} else {
				m = pos
				pos = (pos + 1) % len(g.members)
			}
			byMember[m] = append(byMember[m], uint32(i))
		}
		if !replay {
			g.next = pos
		}
		for m, idx := range byMember {
			if len(idx) > 0 {
				id := g.members[m]
				out[id.Node] = append(out[id.Node], share{local: id.Local, idx: idx})
			}
		}
	}
	return out, replayed
}

// rrStart returns where round robin starts for origin's batch, and
// whether the batch was seen before: then where it started that time;
// else at the group's position, recorded for origin's producer.
func (g *groupRoute) rrStart(origin batchOrigin) (start int, replay, forgot bool) {
	if origin.producer == "" {
		return g.next, false, false
	}
	seen := g.starts[origin.producer]
	for _, st := range seen {
		if st.seq == origin.seq {
			return st.start, true, false
		}
	}
	if len(seen) == maxRRBatches {
		seen = append(seen[:0], seen[1:]...) // forget the oldest
	}
	// Past maxRRStarts producers one is forgotten: a retry of its batches
	// is assigned anew.
	g.starts, forgot = boundedPut(g.starts, origin.producer, append(seen, rrStart{seq: origin.seq, start: g.next}), maxRRStarts)
	return g.next, false, forgot
}

// keys returns each message's key, or nil when no message has one.
func (p payload) keys() []string {
	switch {
	case p.msgs.data != nil && p.msgs.meta != nil:
		keys := make([]string, len(p.msgs.meta))
		for i, m := range p.msgs.meta {
			keys[i] = m.Key
		}
		return keys
	case p.msgs.data == nil && p.withMeta:
		return wire.Keys(p.packed, p.count)
	}
	return nil
}

// sharesToWire and sharesFromWire convert a node's shares.
func sharesToWire(shares []share) []*wire.Share {
	out := make([]*wire.Share, len(shares))
	for i, s := range shares {
		out[i] = &wire.Share{Subscriber: s.local, Indices: s.idx}
	}
	return out
}

// sharesFromWire converts received shares, refusing (as forged or
// corrupted) indices that are not increasing or run past the batch, and a
// subscriber listed twice: a share is then never longer than the batch.
func sharesFromWire(in []*wire.Share, subscribers []string, count int) ([]share, bool) {
	if len(in) == 0 {
		return nil, true
	}
	seen := make(map[string]bool, len(in)+len(subscribers))
	for _, l := range subscribers {
		seen[l] = true
	}
	out := make([]share, len(in))
	for i, s := range in {
		if seen[s.GetSubscriber()] {
			return nil, false
		}
		seen[s.GetSubscriber()] = true
		for j, k := range s.GetIndices() {
			if int(k) >= count || (j > 0 && k <= s.GetIndices()[j-1]) {
				return nil, false
			}
		}
		out[i] = share{local: s.GetSubscriber(), idx: s.GetIndices()}
	}
	return out, true
}

// subset returns the batch restricted to the messages of shares, with the
// shares' indices into it, when that is smaller than the whole batch: a node
// with only group members then gets a third of a batch for a third of the
// work, not all of it. A received batch is unpacked once (unpack) for all
// the nodes it is cut for; a format 2 subset is packed anew, so a header
// that repeated an earlier message's still finds it.
func (p *payload) subset(shares []share) (payload, []share, bool) {
	count := p.len()
	take := make([]bool, count)
	n := 0
	for _, sh := range shares {
		for _, k := range sh.idx {
			if !take[k] {
				take[k] = true
				n++
			}
		}
	}
	if n == count {
		return payload{}, nil, false
	}
	p.unpack()
	all := p.msgs.data
	pos := make([]uint32, count)
	sub := msgBatch{data: make([][]byte, 0, n)}
	if p.msgs.meta != nil {
		sub.meta = make([]wire.Meta, 0, n)
	}
	for i, ok := range take {
		if !ok {
			continue
		}
		pos[i] = uint32(len(sub.data))
		sub.data = append(sub.data, all[i])
		if sub.meta != nil {
			sub.meta = append(sub.meta, p.msgs.meta[i])
		}
	}
	moved := make([]share, len(shares))
	for i, sh := range shares {
		idx := make([]uint32, len(sh.idx))
		for j, k := range sh.idx {
			idx[j] = pos[k]
		}
		moved[i] = share{local: sh.local, idx: idx}
	}
	return payload{msgs: sub, publisher: p.publisher, origin: p.origin, seq: p.seq}, moved, true
}

// publishGroupSizes gives Stats a copy of the group sizes.
func (a *topicActor) publishGroupSizes() {
	if len(a.groups.sizes) == 0 && a.groupSizes.Load() == nil {
		return
	}
	sizes := maps.Clone(a.groups.sizes)
	a.groupSizes.Store(&sizes)
}

// groupBook is what a topic actor knows of its consumer groups.
type groupBook struct {
	plan     *fanoutPlan    // parts are rebuilt after a change of the subscriber set (invalidate)
	next     map[string]int // keyless round-robin position per group, kept across plans
	sizes    map[string]int // members per group
	vanished map[string]bool
	// vanished: groups whose members all went with their nodes (or were
	// evicted): batches report them SubscriberGone until a member joins.
	// A group whose last member unsubscribed ends silently.
}

// invalidate makes the part of the plan a change of the subscriber set
// touched stale: the broadcast lists when g is "", else group g's route,
// keeping its round-robin position: restarting at the first member on
// every change would hand it more than its share.
func (b *groupBook) invalidate(g string) {
	p := b.plan
	if p == nil {
		return
	}
	if g == "" {
		p.broadcast = nil
		return
	}
	p.stale = true
	for i, r := range p.groups {
		if r.name == g {
			if b.next == nil {
				b.next = map[string]int{}
			}
			b.next[g] = r.next
			p.groups = slices.Delete(p.groups, i, i+1)
			return
		}
	}
}

// joined counts a member of group g in.
func (b *groupBook) joined(g string) {
	b.invalidate(g)
	if g == "" {
		return
	}
	if b.sizes == nil {
		b.sizes = map[string]int{}
	}
	b.sizes[g]++
	delete(b.vanished, g)
}

// left counts a member of group g out; the group vanishes with its last
// member unless that one unsubscribed. It returns a vanished group it
// forgot to make room, or "".
func (b *groupBook) left(g string, unsubscribed bool) (forgot string) {
	b.invalidate(g)
	if g == "" {
		return ""
	}
	if b.sizes[g]--; b.sizes[g] > 0 {
		return ""
	}
	delete(b.sizes, g)
	delete(b.next, g)
	if !unsubscribed {
		if b.vanished == nil {
			b.vanished = map[string]bool{}
		}
		if len(b.vanished) >= maxVanishedGroups {
			// Group names that come and go (per host, per deploy) must not
			// grow the map, nor every ack by a failure each.
			for forgot = range b.vanished {
				delete(b.vanished, forgot)
				break
			}
		}
		b.vanished[g] = true
	}
	return forgot
}

// maxVanishedGroups bounds the vanished groups a topic actor reports; past
// it an arbitrary one is forgotten (logged) and ends silently, as if its
// last member had unsubscribed.
const maxVanishedGroups = 64

const noEpoch = ^uint64(0)
