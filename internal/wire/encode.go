package wire

import (
	"encoding/binary"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Field numbers of the messages encoded and decoded by hand, as in
// wire.proto; a test checks them against the generated descriptors.
const (
	envelopePublish protowire.Number = 3
	envelopeDeliver protowire.Number = 5

	refNodeID      protowire.Number = 1
	refIncarnation protowire.Number = 2

	publishFrom         protowire.Number = 1
	publishViewID       protowire.Number = 2
	publishTopic        protowire.Number = 3
	publishPacked       protowire.Number = 5
	publishCount        protowire.Number = 6
	publishProducer     protowire.Number = 7
	publishProducerSeq  protowire.Number = 8
	publishDeliveredIDs protowire.Number = 9
	publishPrev         protowire.Number = 10
	publishSettled      protowire.Number = 11
	publishPackedMeta   protowire.Number = 12
	publishAckLevel     protowire.Number = 13
	publishSkip         protowire.Number = 14
	publishAnswerWithin protowire.Number = 15
	publishSplitID      protowire.Number = 16
	publishSplitChunk   protowire.Number = 17
	publishToInc        protowire.Number = 18
	publishKeptCopy     protowire.Number = 19

	deliverOwner       protowire.Number = 1
	deliverTopic       protowire.Number = 2
	deliverSeq         protowire.Number = 3
	deliverSubscribers protowire.Number = 4
	deliverAtLeastOnce protowire.Number = 6
	deliverPacked      protowire.Number = 7
	deliverCount       protowire.Number = 8
	deliverProducer    protowire.Number = 9
	deliverProducerSeq protowire.Number = 10
	deliverPackedMeta  protowire.Number = 11
	deliverPublisher   protowire.Number = 12
	deliverShares      protowire.Number = 13
	deliverReroute     protowire.Number = 14
	deliverSubTimeout  protowire.Number = 15
	deliverSplitID     protowire.Number = 16
	deliverSplitChunk  protowire.Number = 17
	deliverToInc       protowire.Number = 18
	deliverKeptCopy    protowire.Number = 19
)

// MaxSkip bounds PublishRequest.skip: a publisher names at most this many
// subscribers, and a decoder keeps at most this many. Skipping saves
// failures; a subscriber left off the list is only sent the chunk.
const MaxSkip = 256

// AppendPublish appends Envelope{publish: req} with msgs packed into its
// packed field, copying each message once; with meta (one per message) into
// its packed_meta field in format 2. req.Packed must be empty.
func AppendPublish(dst []byte, req *PublishRequest, msgs [][]byte, meta []Meta) []byte {
	head, _ := proto.Marshal(req)
	if meta != nil {
		return appendWithPacked(dst, envelopePublish, head, publishPackedMeta, PackedMetaSize(msgs, meta), func(b []byte) []byte {
			return PackMeta(b, msgs, meta)
		})
	}
	return appendWithPacked(dst, envelopePublish, head, publishPacked, PackedSize(msgs), func(b []byte) []byte {
		return Pack(b, msgs)
	})
}

// AppendPublishPacked is AppendPublish for messages already packed in
// format 1 (Pack's output, or several of them one after the other).
func AppendPublishPacked(dst []byte, req *PublishRequest, packed []byte) []byte {
	head, _ := proto.Marshal(req)
	return appendWithPacked(dst, envelopePublish, head, publishPacked, len(packed), func(b []byte) []byte {
		return append(b, packed...)
	})
}

// AppendDeliver appends Envelope{deliver: head + packed}: head is an encoded
// DeliverBatch without its packed field, packed the batch's messages, in
// format 2 when withMeta.
func AppendDeliver(dst []byte, head, packed []byte, withMeta bool) []byte {
	field := deliverPacked
	if withMeta {
		field = deliverPackedMeta
	}
	return appendWithPacked(dst, envelopeDeliver, head, field, len(packed), func(b []byte) []byte {
		return append(b, packed...)
	})
}

// MaxKeptCopies bounds DeliverBatch.kept_copy: an owner names at most this
// many copies in one delivery, and a decoder keeps at most this many.
const MaxKeptCopies = 1024

// AppendDeliverKept appends Envelope{deliver: head} with kept_copy ids
// (packed) and no messages: the receiving node holds them
// (DeliverBatch.kept_copy). Fields of the DeliverBatch a suffix appended
// next merge into it.
func AppendDeliverKept(dst []byte, head []byte, ids []uint64) []byte {
	size := 0
	for _, id := range ids {
		size += protowire.SizeVarint(id)
	}
	return appendWithPacked(dst, envelopeDeliver, head, deliverKeptCopy, size, func(b []byte) []byte {
		for _, id := range ids {
			b = protowire.AppendVarint(b, id)
		}
		return b
	})
}

// AppendDeliverMsgs is AppendDeliver for messages not packed yet: they are
// packed straight into dst (format 2 with meta, one per message), so an
// owner cutting a batch for one node copies each message once.
func AppendDeliverMsgs(dst []byte, head []byte, msgs [][]byte, meta []Meta) []byte {
	if meta != nil {
		return appendWithPacked(dst, envelopeDeliver, head, deliverPackedMeta, PackedMetaSize(msgs, meta), func(b []byte) []byte {
			return PackMeta(b, msgs, meta)
		})
	}
	return appendWithPacked(dst, envelopeDeliver, head, deliverPacked, PackedSize(msgs), func(b []byte) []byte {
		return Pack(b, msgs)
	})
}

// appendWithPacked writes envelope field body := head followed by a bytes
// field of size n that fill appends.
func appendWithPacked(dst []byte, body protowire.Number, head []byte, field protowire.Number, n int, fill func([]byte) []byte) []byte {
	inner := len(head) + protowire.SizeTag(field) + protowire.SizeBytes(n)
	dst = protowire.AppendTag(dst, body, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(inner))
	dst = append(dst, head...)
	dst = protowire.AppendTag(dst, field, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(n))
	return fill(dst)
}

// PackedSize is the size of msgs packed in format 1.
func PackedSize(msgs [][]byte) int {
	n := 0
	for _, m := range msgs {
		n += varintLen(uint64(len(m))) + len(m)
	}
	return n
}

func varintLen(x uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], x)
}
