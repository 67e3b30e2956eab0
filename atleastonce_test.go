package pubsub_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

func atLeastOnce(string) pubsub.DeliveryMode { return pubsub.AtLeastOnce }

func TestAtLeastOnceCopiesAreDeliveredOnce(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithDeliveryMode(atLeastOnce))
	rec := newRecorder()
	s := subscribe(t, c.Nodes[0], "alo", rec.handler)
	raw := c.Connect(t, 0)
	batch := &wire.DeliverBatch{
		Owner: &wire.MemberRef{NodeId: "some-owner", Incarnation: 7}, Topic: "alo", Seq: 1,
		Subscribers: []string{s.ID().Local}, Packed: wire.Pack(nil, [][]byte{[]byte("once")}), Count: 1, AtLeastOnce: true,
	}
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: batch}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		m, err := raw.Request("pubsub.node."+c.Nodes[0].ID(), data, 2*time.Second)
		if err != nil {
			t.Fatalf("copy %d: %v", i, err)
		}
		var env wire.Envelope
		if err := proto.Unmarshal(m.Data, &env); err != nil || env.GetReply() == nil {
			t.Fatalf("copy %d: bad reply %v", i, err)
		}
		if st := env.GetReply().GetStatuses(); len(st) != 1 || pubsub.DeliveryStatus(st[0]) != pubsub.Delivered {
			t.Fatalf("copy %d: statuses %v, want [delivered]", i, st)
		}
	}
	if got := rec.of(s.ID()); len(got) != 1 {
		t.Fatalf("handler saw %q for three copies of one batch, want it once", got)
	}
	// At most once, a copy of the batch a subscriber just handled is not
	// handed to it again either, and an older batch of the same owner that
	// arrives late is dropped as out of order rather than delivered after a
	// newer one.
	batch.AtLeastOnce, batch.Seq = false, 2
	data, _ = proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: batch}})
	for i := 0; i < 2; i++ {
		if st := deliverRaw(t, raw, c.Nodes[0].ID(), data); st != pubsub.Delivered {
			t.Fatalf("at-most-once copy %d: status %v, want delivered", i, st)
		}
	}
	batch.Seq = 1
	data, _ = proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: batch}})
	if st := deliverRaw(t, raw, c.Nodes[0].ID(), data); st != pubsub.OutOfOrder {
		t.Fatalf("late older batch: status %v, want out-of-order", st)
	}
	if got := rec.of(s.ID()); len(got) != 2 {
		t.Fatalf("handler saw %d messages, want 2", len(got))
	}
}

// deliverRaw sends one encoded DeliverBatch for a single subscriber to node
// and returns the status the node reported.
func deliverRaw(t *testing.T, raw *nats.Conn, node string, data []byte) pubsub.DeliveryStatus {
	t.Helper()
	m, err := raw.Request("pubsub.node."+node, data, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var env wire.Envelope
	if err := proto.Unmarshal(m.Data, &env); err != nil || len(env.GetReply().GetStatuses()) != 1 {
		t.Fatalf("bad reply %v: %v", &env, err)
	}
	return pubsub.DeliveryStatus(env.GetReply().GetStatuses()[0])
}

func TestAtLeastOnceSurvivesSubscriberServerLoss(t *testing.T) {
	c := newCluster(t, 3, 3, pubsub.WithDeliveryMode(atLeastOnce), pubsub.WithMemberTimeout(5*time.Second),
		pubsub.WithSubscriberTimeout(2*time.Second))
	topic := ownedBy(t, c.Nodes[0], "alo-loss")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[1], topic, rec.handler)
	ctx := ctxT(t)
	ack, err := c.Nodes[0].Publish(ctx, topic, []byte("before"))
	mustAccept(t, ack, err, 1)

	c.ShutdownServer(1) // node 1 reconnects to another server; deliveries meanwhile are lost
	ack, err = c.Nodes[0].Publish(ctx, topic, []byte("during"))
	mustAccept(t, ack, err, 1)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(rec.of(s.ID())) >= 2 }, "subscriber did not get the message sent during the outage")
	if got := rec.of(s.ID()); len(got) != 2 || got[1] != "during" {
		t.Fatalf("subscriber got %q, want [before during] exactly once each", got)
	}
}

// A subscriber node keeps each BatchingProducer's order: a batch older than
// one already handed to the subscriber is dropped and reported OutOfOrder,
// the same batch again counts as delivered without running the handler.
func TestNodeKeepsProducerOrder(t *testing.T) {
	c := newCluster(t, 1, 1)
	rec := newRecorder()
	s := subscribe(t, c.Nodes[0], "ordered", rec.handler)
	raw := c.Connect(t, 0)
	send := func(seq uint64, data string) pubsub.DeliveryStatus {
		t.Helper()
		env := &wire.Envelope{Body: &wire.Envelope_Deliver{Deliver: &wire.DeliverBatch{
			Owner: &wire.MemberRef{NodeId: "owner", Incarnation: 1}, Topic: "ordered", Seq: seq,
			Subscribers: []string{s.ID().Local}, Packed: wire.Pack(nil, [][]byte{[]byte(data)}), Count: 1,
			Producer: "producer-a", ProducerSeq: seq,
		}}}
		b, _ := proto.Marshal(env)
		m, err := raw.Request("pubsub.node."+c.Nodes[0].ID(), b, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var rep wire.Envelope
		if err := proto.Unmarshal(m.Data, &rep); err != nil || len(rep.GetReply().GetStatuses()) != 1 {
			t.Fatalf("bad reply: %v", err)
		}
		return pubsub.DeliveryStatus(rep.GetReply().GetStatuses()[0])
	}
	for _, step := range []struct {
		seq  uint64
		data string
		want pubsub.DeliveryStatus
	}{
		{5, "five", pubsub.Delivered},
		{3, "three", pubsub.OutOfOrder},
		{5, "five again", pubsub.Delivered},
		{6, "six", pubsub.Delivered},
	} {
		if got := send(step.seq, step.data); got != step.want {
			t.Fatalf("batch %d: status %s, want %s", step.seq, got, step.want)
		}
	}
	if got := rec.of(s.ID()); len(got) != 2 || got[0] != "five" || got[1] != "six" {
		t.Fatalf("handler saw %q, want [five six]", got)
	}
}
