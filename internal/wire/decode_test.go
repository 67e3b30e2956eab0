package wire

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Decode must agree with proto.Unmarshal on every envelope, including a
// deliver envelope sent as two concatenated encodings (shared part, then the
// node's subscriber list).
func TestDecodeAgreesWithProto(t *testing.T) {
	packed := Pack(nil, [][]byte{[]byte("one"), []byte("two")})
	common, _ := proto.Marshal(&Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{
		Owner: &MemberRef{NodeId: "n1", Incarnation: 9}, Topic: "t", Seq: 7, Packed: packed, Count: 2, AtLeastOnce: true,
		Producer: "p1", ProducerSeq: 42, SplitId: 1<<63 | 5, SplitChunk: 3, ToIncarnation: 8}}})
	suffix, _ := proto.Marshal(&Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{Subscribers: []string{"a", "b"},
		Shares: []*Share{{Subscriber: "c@g", Indices: []uint32{0, 2}}, {Subscriber: "d@g", Indices: []uint32{1}}}}}})
	pub, _ := proto.Marshal(&Envelope{Body: &Envelope_Publish{Publish: &PublishRequest{
		From: &MemberRef{NodeId: "n2", Incarnation: 3}, ViewId: 11, Topic: "orders", Packed: packed, Count: 2,
		Producer: "p1", ProducerSeq: 43, SplitId: 1<<63 | 5, SplitChunk: 4, ToIncarnation: 9, KeptCopy: 1<<40 | 7, Skip: []*Failure{{Node: "n3", Local: "s1"}, {Node: "n4", Local: "s2"}}}}})
	keptHead, _ := proto.Marshal(&DeliverBatch{Owner: &MemberRef{NodeId: "n1", Incarnation: 9}, Topic: "t", Seq: 8, Count: 2})
	kept := append(AppendDeliverKept(nil, keptHead, []uint64{1<<40 | 7, 3}), suffix...)
	hb, _ := proto.Marshal(&Envelope{Body: &Envelope_Heartbeat{Heartbeat: &Heartbeat{From: &MemberRef{NodeId: "x"}}}})
	for name, data := range map[string][]byte{
		"deliver": append(append([]byte{}, common...), suffix...),
		"publish": pub,
		"kept":    kept,
		"other":   hb,
	} {
		var want, got Envelope
		if err := proto.Unmarshal(data, &want); err != nil {
			t.Fatal(err)
		}
		if err := Decode(data, &got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !proto.Equal(&want, &got) {
			t.Fatalf("%s: Decode = %v, want %v", name, &got, &want)
		}
	}
}

// A decoder keeps at most MaxSkip entries of a publish's skip list: a
// forged request cannot make it allocate one object per two bytes.
func TestDecodeKeepsAtMostMaxSkipEntries(t *testing.T) {
	req := &PublishRequest{Topic: "t"}
	for range MaxSkip + 50 {
		req.Skip = append(req.Skip, &Failure{Node: "n", Local: "s"})
	}
	data, err := proto.Marshal(&Envelope{Body: &Envelope_Publish{Publish: req}})
	if err != nil {
		t.Fatal(err)
	}
	var env Envelope
	if err := Decode(data, &env); err != nil {
		t.Fatal(err)
	}
	if got := len(env.GetPublish().GetSkip()); got != MaxSkip {
		t.Fatalf("decoded %d skip entries, want %d", got, MaxSkip)
	}
}

func FuzzDecode(f *testing.F) {
	pub, _ := proto.Marshal(&Envelope{Body: &Envelope_Publish{Publish: &PublishRequest{Topic: "t", Packed: Pack(nil, [][]byte{[]byte("x")}), Count: 1}}})
	f.Add(pub)
	f.Add([]byte{0x2a, 0x02, 0x10, 0x01})
	meta, _ := proto.Marshal(&Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{Topic: "t", Publisher: "n",
		PackedMeta: PackMeta(nil, [][]byte{[]byte("x"), nil}, []Meta{{Key: "k", Header: map[string][]string{"a": {"1"}}}, {}}), Count: 2}}})
	f.Add(meta)
	f.Fuzz(func(t *testing.T, data []byte) {
		var env Envelope
		_ = Decode(data, &env) // must not panic
	})
}

// A decoder keeps at most MaxKeptCopies numbers of a delivery's kept
// copies, packed or not: a forged list costs no more than that.
func TestDecodeKeepsAtMostMaxKeptCopies(t *testing.T) {
	ids := make([]uint64, MaxKeptCopies+50)
	for i := range ids {
		ids[i] = uint64(i + 1)
	}
	for name, data := range map[string][]byte{
		"packed":   AppendDeliverKept(nil, nil, ids),
		"unpacked": unpackedKept(ids),
	} {
		var env Envelope
		if err := Decode(data, &env); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := env.GetDeliver().GetKeptCopy(); len(got) != MaxKeptCopies || got[0] != 1 {
			t.Fatalf("%s: decoded %d numbers starting %v, want %d from 1", name, len(got), got[:1], MaxKeptCopies)
		}
	}
}

// unpackedKept encodes a deliver envelope with each kept copy number as a
// field of its own, as an encoder may.
func unpackedKept(ids []uint64) []byte {
	var body []byte
	for _, id := range ids {
		body = protowire.AppendTag(body, deliverKeptCopy, protowire.VarintType)
		body = protowire.AppendVarint(body, id)
	}
	out := protowire.AppendTag(nil, envelopeDeliver, protowire.BytesType)
	return protowire.AppendBytes(out, body)
}

// The hand-assembled batch envelopes decode to what proto would encode.
func TestAppendBatchEnvelopes(t *testing.T) {
	msgs := [][]byte{[]byte("one"), make([]byte, 300), {}}
	req := &PublishRequest{From: &MemberRef{NodeId: "n", Incarnation: 2}, ViewId: 3, Topic: "t", Count: 3, Producer: "p", ProducerSeq: 9}
	got := AppendPublish([]byte("x"), req, msgs, nil)[1:]
	want := &Envelope{Body: &Envelope_Publish{Publish: &PublishRequest{From: req.From, ViewId: 3, Topic: "t", Count: 3, Producer: "p", ProducerSeq: 9, Packed: Pack(nil, msgs)}}}
	var env Envelope
	if err := proto.Unmarshal(got, &env); err != nil || !proto.Equal(&env, want) {
		t.Fatalf("AppendPublish decodes to %v (%v), want %v", &env, err, want)
	}
	head, _ := proto.Marshal(&DeliverBatch{Owner: req.From, Topic: "t", Seq: 4, Count: 3})
	got = AppendDeliver(nil, head, Pack(nil, msgs), false)
	wantD := &Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{Owner: req.From, Topic: "t", Seq: 4, Count: 3, Packed: Pack(nil, msgs)}}}
	env.Reset()
	if err := proto.Unmarshal(got, &env); err != nil || !proto.Equal(&env, wantD) {
		t.Fatalf("AppendDeliver decodes to %v (%v), want %v", &env, err, wantD)
	}

	// A delivery naming a kept copy carries the head, the copy's number
	// and no messages.
	got = AppendDeliverKept(nil, head, []uint64{77, 1 << 50})
	wantD = &Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{Owner: req.From, Topic: "t", Seq: 4, Count: 3, KeptCopy: []uint64{77, 1 << 50}}}}
	env.Reset()
	if err := proto.Unmarshal(got, &env); err != nil || !proto.Equal(&env, wantD) {
		t.Fatalf("AppendDeliverKept decodes to %v (%v), want %v", &env, err, wantD)
	}

	// Format 2 goes in the packed_meta fields, and Decode reads them as
	// proto does.
	meta := []Meta{{Key: "k1"}, {}, {Header: map[string][]string{"h": {"v1", "v2"}}}}
	req.AnswerWithinMs = 1500
	got = AppendPublish(nil, req, msgs, meta)
	want = &Envelope{Body: &Envelope_Publish{Publish: &PublishRequest{From: req.From, ViewId: 3, Topic: "t", Count: 3, Producer: "p", ProducerSeq: 9,
		AnswerWithinMs: 1500, PackedMeta: PackMeta(nil, msgs, meta)}}}
	var dec Envelope
	env.Reset()
	if err := proto.Unmarshal(got, &env); err != nil || !proto.Equal(&env, want) {
		t.Fatalf("AppendPublish with meta decodes to %v (%v), want %v", &env, err, want)
	}
	if err := Decode(got, &dec); err != nil || !proto.Equal(&dec, want) {
		t.Fatalf("Decode of a publish with meta = %v (%v), want %v", &dec, err, want)
	}
	got = AppendDeliver(nil, head, PackMeta(nil, msgs, meta), true)
	wantD = &Envelope{Body: &Envelope_Deliver{Deliver: &DeliverBatch{Owner: req.From, Topic: "t", Seq: 4, Count: 3, PackedMeta: PackMeta(nil, msgs, meta)}}}
	dec.Reset()
	if err := Decode(got, &dec); err != nil || !proto.Equal(&dec, wantD) {
		t.Fatalf("Decode of a deliver with meta = %v (%v), want %v", &dec, err, wantD)
	}

	// AppendDeliverMsgs packs into the envelope what AppendDeliver is
	// given packed, in either format.
	if a, b := AppendDeliverMsgs([]byte("x"), head, msgs, meta), append([]byte("x"), got...); string(a) != string(b) {
		t.Fatalf("AppendDeliverMsgs with meta = %x, want %x", a, b)
	}
	if a, b := AppendDeliverMsgs(nil, head, msgs, nil), AppendDeliver(nil, head, Pack(nil, msgs), false); string(a) != string(b) {
		t.Fatalf("AppendDeliverMsgs = %x, want %x", a, b)
	}
}

// The hand-written codec's field numbers match wire.proto's.
func TestHandCodedFieldNumbersMatchTheProto(t *testing.T) {
	check := func(m proto.Message, want map[string]protowire.Number) {
		t.Helper()
		fields := m.ProtoReflect().Descriptor().Fields()
		for name, num := range want {
			f := fields.ByName(protoreflect.Name(name))
			if f == nil || f.Number() != num {
				t.Errorf("%T.%s: hand-coded number %d, proto says %v", m, name, num, f)
			}
		}
	}
	check(&Envelope{}, map[string]protowire.Number{"publish": envelopePublish, "deliver": envelopeDeliver})
	check(&MemberRef{}, map[string]protowire.Number{"node_id": refNodeID, "incarnation": refIncarnation})
	check(&PublishRequest{}, map[string]protowire.Number{"from": publishFrom, "view_id": publishViewID, "topic": publishTopic,
		"packed": publishPacked, "count": publishCount, "producer": publishProducer, "producer_seq": publishProducerSeq, "delivered_ids": publishDeliveredIDs,
		"producer_prev": publishPrev, "producer_settled": publishSettled, "packed_meta": publishPackedMeta, "ack_level": publishAckLevel,
		"skip": publishSkip, "answer_within_ms": publishAnswerWithin, "split_id": publishSplitID, "split_chunk": publishSplitChunk,
		"to_incarnation": publishToInc, "kept_copy": publishKeptCopy})
	check(&DeliverBatch{}, map[string]protowire.Number{"owner": deliverOwner, "topic": deliverTopic, "seq": deliverSeq, "subscribers": deliverSubscribers,
		"at_least_once": deliverAtLeastOnce, "packed": deliverPacked, "count": deliverCount, "producer": deliverProducer, "producer_seq": deliverProducerSeq,
		"packed_meta": deliverPackedMeta, "publisher": deliverPublisher, "shares": deliverShares,
		"reroute": deliverReroute, "subscriber_timeout_ms": deliverSubTimeout, "split_id": deliverSplitID, "split_chunk": deliverSplitChunk,
		"to_incarnation": deliverToInc, "kept_copy": deliverKeptCopy})
}
