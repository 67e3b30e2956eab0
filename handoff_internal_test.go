package pubsub

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
		size := proto.Size(&wire.Sync{From: &wire.MemberRef{NodeId: "n", Incarnation: 1}, ViewId: 1, Topics: p})
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

func TestSyncPagesCarryEveryEntryOnceInOrder(t *testing.T) {
	var entries [][2]string
	for i := range 50 {
		for j := range 1 + i%9 {
			entries = append(entries, [2]string{fmt.Sprintf("topic-%02d", i), fmt.Sprintf("sub-%d", j)})
		}
	}
	var got [][2]string
	afterT, afterS := "", ""
	pages := 0
	for {
		page := syncPage(entries, afterT, afterS, 200)
		pages++
		require.NotEmpty(t, page.GetTopics(), "page %d is empty", pages)
		for _, ts := range page.GetTopics() {
			for _, s := range ts.GetSubscribers() {
				got = append(got, [2]string{ts.GetTopic(), s})
			}
		}
		if !page.GetMore() {
			break
		}
		last := got[len(got)-1]
		afterT, afterS = last[0], last[1]
	}
	assert.Greater(t, pages, 3, "a small limit must need several pages")
	assert.Equal(t, entries, got)
	empty := syncPage(nil, "", "", 200)
	assert.False(t, empty.GetMore())
	assert.Empty(t, empty.GetTopics())
}

func TestRegistryCompletesOnlyWithEveryMemberOfItsView(t *testing.T) {
	n, v := registryNodeForTest(t, Member{ID: "a", Incarnation: 1}, Member{ID: "b", Incarnation: 2}, Member{ID: "c", Incarnation: 3})
	topic := ownedTopics(n, "a", "t", 1)[0]
	subs := func(s string) []*wire.TopicSubscribers {
		return []*wire.TopicSubscribers{{Topic: topic, Subscribers: []string{s}}}
	}
	n.owner.registry.applyPulled(v, Member{ID: "b", Incarnation: 2}, subs("x"), 0)
	_, ok := n.owner.registry.take(topic, v.epoch)
	require.False(t, ok, "complete without c")
	// An answer asked for under an earlier view, before a member vanished
	// (the registry was reset with every member to ask), is dropped.
	n.owner.registry.applyPulled(newView(0, []Member{{ID: "a", Incarnation: 1}, {ID: "c", Incarnation: 3}}), Member{ID: "c", Incarnation: 3}, subs("stale"), 0)
	_, ok = n.owner.registry.take(topic, v.epoch)
	require.False(t, ok, "an answer for another view completed this one")
	n.owner.registry.applyPulled(v, Member{ID: "c", Incarnation: 3}, subs("y"), 0)
	// Completion hands the topic's subscribers to its actor, which becomes ready.
	require.NoError(t, n.life.goroutines.wait(t.Context()))
	n.owner.mu.Lock()
	a := n.owner.topics[topic]
	n.owner.mu.Unlock()
	require.NotNil(t, a)
	require.True(t, a.ready)
	assert.Len(t, a.nodes["b"].set, 1)
	assert.Len(t, a.nodes["c"].set, 1)
	assert.NotContains(t, a.nodes["c"].set, "stale")
}
