package wire

import (
	"errors"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Decode unmarshals an Envelope. Publish and deliver bodies, which carry the
// batches, are decoded by hand so that their packed messages alias data
// instead of being copied: data must then stay unmodified while they are in
// use (NATS hands each subscription callback a fresh slice, so it does).
// Everything else goes through proto.Unmarshal.
func Decode(data []byte, env *Envelope) error {
	num, typ, n := protowire.ConsumeTag(data)
	if n < 0 || typ != protowire.BytesType || (num != envelopePublish && num != envelopeDeliver) {
		return proto.Unmarshal(data, env)
	}
	var pub *PublishRequest
	var del *DeliverBatch
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return errMalformed
		}
		data = data[n:]
		if typ != protowire.BytesType || (num != envelopePublish && num != envelopeDeliver) {
			return errMalformed // a batch envelope holds nothing else
		}
		body, n := protowire.ConsumeBytes(data)
		if n < 0 {
			return errMalformed
		}
		data = data[n:]
		var err error
		switch {
		case num == envelopePublish && del == nil:
			if pub == nil {
				pub = &PublishRequest{}
			}
			err = decodePublish(body, pub)
		case num == envelopeDeliver && pub == nil:
			if del == nil {
				del = &DeliverBatch{}
			}
			err = decodeDeliver(body, del)
		default:
			err = errMalformed
		}
		if err != nil {
			return err
		}
	}
	if pub != nil {
		env.Body = &Envelope_Publish{Publish: pub}
	} else {
		env.Body = &Envelope_Deliver{Deliver: del}
	}
	return nil
}

var errMalformed = errors.New("wire: malformed envelope")

// field walks the fields of a message, calling fn with each field's number,
// type and raw value (the varint, or the bytes of a length-delimited field).
func fields(b []byte, fn func(num protowire.Number, v uint64, bytes []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		var v uint64
		var bs []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			bs, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		if err := fn(num, v, bs); err != nil {
			return err
		}
	}
	return nil
}

func decodeRef(b []byte) (*MemberRef, error) {
	ref := &MemberRef{}
	return ref, fields(b, func(num protowire.Number, v uint64, bs []byte) error {
		switch num {
		case refNodeID:
			ref.NodeId = string(bs)
		case refIncarnation:
			ref.Incarnation = v
		}
		return nil
	})
}

func decodePublish(b []byte, p *PublishRequest) error {
	return fields(b, func(num protowire.Number, v uint64, bs []byte) (err error) {
		switch num {
		case publishFrom:
			p.From, err = decodeRef(bs)
		case publishViewID:
			p.ViewId = v
		case publishTopic:
			p.Topic = string(bs)
		case publishPacked:
			p.Packed = bs
		case publishPackedMeta:
			p.PackedMeta = bs
		case publishAckLevel:
			p.AckLevel = uint32(v)
		case publishAnswerWithin:
			p.AnswerWithinMs = uint32(v)
		case publishCount:
			p.Count = uint32(v)
		case publishProducer:
			p.Producer = string(bs)
		case publishProducerSeq:
			p.ProducerSeq = v
		case publishDeliveredIDs:
			p.DeliveredIds = v != 0
		case publishPrev:
			p.ProducerPrev = v
		case publishSettled:
			p.ProducerSettled = v
		case publishSplitID:
			p.SplitId = v
		case publishSplitChunk:
			p.SplitChunk = uint32(v)
		case publishToInc:
			p.ToIncarnation = v
		case publishKeptCopy:
			p.KeptCopy = v
		case publishSkip:
			if len(p.Skip) >= MaxSkip {
				return nil // a forged list costs no more than MaxSkip entries
			}
			f := &Failure{}
			if err = proto.Unmarshal(bs, f); err == nil {
				p.Skip = append(p.Skip, f)
			}
		}
		return err
	})
}

func decodeDeliver(b []byte, d *DeliverBatch) error {
	return fields(b, func(num protowire.Number, v uint64, bs []byte) (err error) {
		switch num {
		case deliverOwner:
			d.Owner, err = decodeRef(bs)
		case deliverTopic:
			d.Topic = string(bs)
		case deliverSeq:
			d.Seq = v
		case deliverSubscribers:
			d.Subscribers = append(d.Subscribers, string(bs))
		case deliverAtLeastOnce:
			d.AtLeastOnce = v != 0
		case deliverPacked:
			d.Packed = bs
		case deliverPackedMeta:
			d.PackedMeta = bs
		case deliverPublisher:
			d.Publisher = string(bs)
		case deliverReroute:
			d.Reroute = v != 0
		case deliverShares:
			sh := &Share{}
			if err = proto.Unmarshal(bs, sh); err == nil {
				d.Shares = append(d.Shares, sh)
			}
		case deliverCount:
			d.Count = uint32(v)
		case deliverProducer:
			d.Producer = string(bs)
		case deliverProducerSeq:
			d.ProducerSeq = v
		case deliverSubTimeout:
			d.SubscriberTimeoutMs = uint32(v)
		case deliverSplitID:
			d.SplitId = v
		case deliverSplitChunk:
			d.SplitChunk = uint32(v)
		case deliverToInc:
			d.ToIncarnation = v
		case deliverKeptCopy:
			if bs == nil { // one number, not packed
				bs = protowire.AppendVarint(nil, v)
			}
			for len(bs) > 0 {
				id, n := protowire.ConsumeVarint(bs)
				if n < 0 {
					return errMalformed
				}
				if len(d.KeptCopy) >= MaxKeptCopies {
					return nil // a forged list costs no more than MaxKeptCopies entries
				}
				d.KeptCopy = append(d.KeptCopy, id)
				bs = bs[n:]
			}
		}
		return err
	})
}
