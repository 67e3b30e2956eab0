package pubsub

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

func TestSplitSyncFitsEveryPartAndKeepsEverything(t *testing.T) {
	const limit = 4 << 10
	var topics []*wire.TopicSubscribers
	want := 0
	for i := 0; i < 300; i++ {
		ts := &wire.TopicSubscribers{Topic: fmt.Sprintf("topic-%d", i)}
		n := 1 + i%7
		if i == 17 {
			n = 2000 // one topic alone is larger than a part
		}
		for j := 0; j < n; j++ {
			ts.Subscribers = append(ts.Subscribers, fmt.Sprintf("sub-%d-%d", i, j))
		}
		want += n
		topics = append(topics, ts)
	}
	parts := splitSync(topics, limit)
	if len(parts) < 2 {
		t.Fatalf("%d parts, want several", len(parts))
	}
	seen := map[string]bool{}
	for i, p := range parts {
		size := proto.Size(&wire.Sync{From: &wire.MemberRef{NodeId: "n", Incarnation: 1}, ViewId: 1, Topics: p, Part: uint32(i), Parts: uint32(len(parts))})
		if size > limit+64 {
			t.Errorf("part %d is %d bytes, limit %d", i, size, limit)
		}
		for _, ts := range p {
			for _, s := range ts.GetSubscribers() {
				if seen[ts.GetTopic()+"/"+s] {
					t.Errorf("%s/%s twice", ts.GetTopic(), s)
				}
				seen[ts.GetTopic()+"/"+s] = true
			}
		}
	}
	if len(seen) != want {
		t.Fatalf("parts carry %d subscriptions, want %d", len(seen), want)
	}
	if got := splitSync(nil, limit); len(got) != 1 || len(got[0]) != 0 {
		t.Fatalf("empty sync split into %v, want one empty part", got)
	}
}

func TestRegistryCompletesOnlyWithEveryPart(t *testing.T) {
	n := &Node{id: "a", incarnation: 1, topics: map[string]*topicActor{}}
	n.events = newEventStream(n)
	v := newView(1, []Member{{ID: "a", Incarnation: 1}, {ID: "b", Incarnation: 2}})
	n.curView.Store(v)
	n.history = []*view{v}
	n.registry.init(n)
	n.registry.reset(v, nil)
	var topic string
	for i := 0; ; i++ {
		if topic = fmt.Sprintf("t%d", i); v.ownerOf(topic).ID == "a" {
			break
		}
	}
	from := &wire.MemberRef{NodeId: "b", Incarnation: 2}
	part := func(i uint32, sub string) *wire.Sync {
		return &wire.Sync{From: from, ViewId: v.id, Part: i, Parts: 2,
			Topics: []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{sub}}}}
	}
	n.registry.apply(part(0, "x"))
	n.registry.apply(part(0, "x")) // a retried part counts once
	if _, ok := n.registry.take(topic, v.epoch); ok {
		t.Fatal("registry complete after one of two parts")
	}
	// A part for a view this node has not reached is kept, not applied.
	n.registry.apply(&wire.Sync{From: from, ViewId: v.id + 1, Parts: 1})
	if _, ok := n.registry.take(topic, v.epoch); ok {
		t.Fatal("a sync for another view completed this one")
	}
	n.registry.apply(part(1, "y"))
	// Completion hands the topic's subscribers to its actor, which becomes ready.
	if err := n.goroutines.wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	n.topicsMu.Lock()
	a := n.topics[topic]
	n.topicsMu.Unlock()
	if a == nil || !a.ready || a.nodes["b"] == nil || len(a.nodes["b"].set) != 2 {
		t.Fatalf("actor after completion: %+v; want ready with b's subscribers x and y", a)
	}
}
