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

// Events emitted just before the node closes the stream still reach every
// listener: a node's NodeStopped is emitted right before it closes.
func TestEventsEmittedBeforeCloseAreDelivered(t *testing.T) {
	for i := range 500 {
		s := newEventStream("n")
		got := make(chan Event, 4)
		cancel := s.Subscribe(func(e Event) { got <- e })
		emit(s, NodeStopped{Err: ErrClosed})
		s.close()
		cancel() // waits for the listener to finish
		select {
		case e := <-got:
			if _, ok := e.(NodeStopped); !ok {
				t.Fatalf("round %d: got %T, want NodeStopped", i, e)
			}
		default:
			t.Fatalf("round %d: the event emitted before close was lost", i)
		}
	}
}
