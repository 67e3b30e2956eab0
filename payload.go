package pubsub

import (
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A batch's messages as the owner and the subscriber nodes hold them.

// payload is one batch's messages: the publisher's own slices when it
// published on this node, or the packed wire field as received. Either way
// no message is copied on its way to the handlers.
type payload struct {
	msgs      msgBatch
	packed    []byte
	withMeta  bool // packed is in format 2: keys and headers beside the bytes
	count     int
	publisher string // the publishing node's ID
	origin    batchOrigin
	seq       batchSeq // set by the owner when it accepts the batch
	wantIDs   bool     // the publisher asked for the delivered subscribers
	level     AckLevel // what the publisher waits for
	// answerBy: when the publisher stops waiting for the answer (zero:
	// it did not say), as this node's clock reads it.
	answerBy time.Time
	// skip: subscribers that failed an earlier chunk of this split batch,
	// left out of this one (the publisher's chunkAcks.skip).
	skip []*wire.Failure
	// packedHere: wire packed packed from msgs, a publisher's own slices,
	// which msgs still alias (not packed, as a received batch's do).
	packedHere bool
	// kept: the copies of these messages the publisher kept (kept.go), by
	// their numbers and the publisher's incarnation; no ids when none.
	kept keptRef
}

// keptRef names the copies of a batch its publisher kept: one, or one per
// request the owner merged into the batch (early.go).
type keptRef struct {
	ids []uint64
	inc uint64
}

// keptFor returns the numbers of the copies m holds of these messages, or nil:
// only their publisher, in the incarnation that sent them, holds one. A
// node with only group members (broadcast false) is sent their messages
// instead: a share is a part of the batch, and taking it from the whole
// batch there cost more than the bytes saved (group fan-out 1.57-1.63x
// raw against 1.75-1.82x with the share sent, interleaved runs).
func (p *payload) keptFor(m Member, broadcast bool) []uint64 {
	if len(p.kept.ids) == 0 || !broadcast || m.ID != p.publisher || m.Incarnation != p.kept.inc {
		return nil
	}
	return p.kept.ids
}

// receivedPayload checks the packed fields of a batch received over NATS:
// exactly one format, holding exactly count messages. A node that knew only
// format 1 rejects a format 2 batch the same way, finding no messages.
func receivedPayload(packed, packedMeta []byte, count uint32) (payload, error) {
	if len(packedMeta) > 0 {
		if len(packed) > 0 {
			return payload{}, wire.ErrBadPacking
		}
		return payload{packed: packedMeta, withMeta: true, count: int(count)}, wire.ValidateMeta(packedMeta, count)
	}
	return payload{packed: packed, count: int(count)}, wire.Validate(packed, count)
}

// batchSeq is the owner's number for an accepted batch of one topic.
type batchSeq struct {
	owner string
	inc   uint64
	seq   uint64
}

// bytes is the size of the messages, as a budget counts them.
func (p payload) bytes() int {
	if p.packed != nil {
		return len(p.packed)
	}
	size := 0
	for _, d := range p.msgs.data {
		size += len(d)
	}
	return size
}

func (p payload) len() int {
	if p.msgs.data != nil {
		return p.msgs.len()
	}
	return p.count
}

// wire returns the packed form, packing the publisher's slices if needed,
// and whether it is format 2.
func (p *payload) wire() ([]byte, bool) {
	if p.packed == nil {
		p.packedHere = true
		if p.msgs.meta != nil {
			p.packed, p.withMeta = wire.PackMeta(nil, p.msgs.data, p.msgs.meta), true
		} else {
			p.packed = wire.Pack(nil, p.msgs.data)
		}
	}
	return p.packed, p.withMeta
}

// messages builds the Messages a node's subscribers share, in a leased
// slice (messageLease) the caller holds once. A message without key or
// header costs nothing more than its Message.
func (p payload) messages(topic string) *messageLease {
	lease := leaseMessages(p.len())
	batch := lease.msgs
	switch {
	case p.msgs.data != nil && p.msgs.meta == nil:
		for _, data := range p.msgs.data {
			batch = append(batch, Message{Topic: topic, Data: data, Publisher: p.publisher})
		}
	case p.msgs.data != nil:
		for i, data := range p.msgs.data {
			meta := &p.msgs.meta[i]
			batch = append(batch, Message{Topic: topic, Data: data, Key: meta.Key, Header: meta.Header, Publisher: p.publisher})
		}
	case p.withMeta:
		var dec wire.MetaDecoder // equal headers in a row share one map
		wire.EachMeta(p.packed, func(data, meta []byte) {
			m := Message{Topic: topic, Data: data, Publisher: p.publisher}
			if meta != nil {
				md := dec.Decode(meta)
				m.Key, m.Header = md.Key, md.Header
			}
			batch = append(batch, m)
		})
	default:
		wire.Each(p.packed, func(data []byte) { batch = append(batch, Message{Topic: topic, Data: data, Publisher: p.publisher}) })
	}
	lease.msgs = batch
	return lease
}

// shareMessages returns the Messages of a group member's share, at idx,
// held once for the caller: whole itself when the share is all of it in
// order (a member's node is sent only its members' messages), else a
// lease of their own, taken from whole, or from p's unpacked slices when
// whole is nil.
func (p payload) shareMessages(topic string, whole *messageLease, idx []uint32) *messageLease {
	var batch []Message
	if whole != nil {
		batch = whole.msgs
	}
	if batch != nil && len(idx) == len(batch) && inOrder(idx) {
		whole.hold()
		return whole
	}
	part := leaseMessages(len(idx))
	for _, k := range idx {
		if batch != nil {
			part.msgs = append(part.msgs, batch[k])
			continue
		}
		m := Message{Topic: topic, Data: p.msgs.data[k], Publisher: p.publisher}
		if p.msgs.meta != nil {
			m.Key, m.Header = p.msgs.meta[k].Key, p.msgs.meta[k].Header
		}
		part.msgs = append(part.msgs, m)
	}
	return part
}

// inOrder reports whether idx is 0, 1, 2, ...
func inOrder(idx []uint32) bool {
	for j, k := range idx {
		if k != uint32(j) {
			return false
		}
	}
	return true
}

// unpack fills p.msgs, once, with the messages of a batch received packed:
// their bytes, and for format 2 their keys and headers (aliasing packed,
// as Messages do). p.packed stays what nodes that get the whole batch are
// sent.
func (p *payload) unpack() {
	if p.msgs.data != nil {
		return
	}
	data := make([][]byte, 0, p.count)
	if !p.withMeta {
		wire.Each(p.packed, func(m []byte) { data = append(data, m) })
		p.msgs = msgBatch{data: data}
		return
	}
	meta := make([]wire.Meta, 0, p.count)
	var dec wire.MetaDecoder // a header repeating the previous one is decoded in order
	wire.EachMeta(p.packed, func(d, m []byte) {
		data = append(data, d)
		var md wire.Meta
		if m != nil {
			md = dec.Decode(m)
		}
		meta = append(meta, md)
	})
	p.msgs = msgBatch{data: data, meta: meta}
}
