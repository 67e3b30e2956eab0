package pubsub

import "testing"

// With nobody listening, emitting costs an atomic load and no allocation.
func TestEmitWithoutListenersAllocatesNothing(t *testing.T) {
	n := &Node{self: Member{ID: "n"}}
	n.events = newEventStream(n.self.ID)
	ack := PublishAck{Topic: "t", Status: Accepted, Messages: 10, Delivered: 3,
		Failures: []DeliveryFailure{{Subscriber: SubscriberID{Node: "a", Local: "1"}, Status: Timeout}}}
	allocs := testing.AllocsPerRun(1000, func() {
		n.emitAccepted(ack)
		emit(n.events, SubscriberEvicted{Topic: "t", Subscriber: ack.Failures[0].Subscriber, Status: Timeout})
		emit(n.events, SubscriberRemoved{Topic: "t", Subscriber: ack.Failures[0].Subscriber})
	})
	if allocs != 0 {
		t.Fatalf("emitting with no listener allocates %.1f times per call", allocs)
	}
	cancel := n.events.Subscribe(func(Event) {})
	defer cancel()
	if !n.events.enabled() {
		t.Fatal("stream not enabled with a listener")
	}
}

func BenchmarkEmitNoListener(b *testing.B) {
	n := &Node{self: Member{ID: "n"}}
	n.events = newEventStream(n.self.ID)
	ack := PublishAck{Topic: "t", Status: Accepted, Messages: 10, Delivered: 3}
	b.ReportAllocs()
	for b.Loop() {
		n.emitAccepted(ack)
	}
}
