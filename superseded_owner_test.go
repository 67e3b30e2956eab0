package pubsub_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Publishes to a topic a replaced node owned, right after the heal: the
// older incarnation (cut off past MemberTimeout, replaced under its ID)
// still believes it owns the topic and hears requests to the ID's subject
// until it stops. Every publish must be answered by one owner and reach the
// subscriber once: no ack claims a delivery that did not happen, and no
// message arrives twice (from both incarnations).
func TestPublishesRightAfterAReplacedOwnersHealReachSubscribersOnce(t *testing.T) {
	leakcheck.Parallel(t)
	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[2], "superseded-owner")
	rec := newRecorder()
	s := subscribe(t, c.Nodes[1], topic, rec.handler) // registered at the older owner
	publishUntilAccepted(t, c.Nodes[0], topic, []byte("before"), 1, 10*time.Second)
	c.Client(2).Stall(faultnet.Both)
	testcluster.WaitFor(t, 10*time.Second, func() bool { return !hasMember(c.Nodes[0], "n2") && !hasMember(c.Nodes[1], "n2") }, "n2 not dropped")
	n2 := c.AddNode(t, "n2", 2, fast...)
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		m, err := c.Nodes[0].OwnerOf(topic)
		return err == nil && m.ID == "n2" && m.Incarnation == memberRef(t, n2, "n2").GetIncarnation()
	}, "the replacement does not own the topic")
	publishUntilAccepted(t, c.Nodes[0], topic, []byte("replaced"), 1, 10*time.Second)
	before := len(rec.of(s.ID()))

	c.HealAll()
	var (
		mu   sync.Mutex
		bad  []string
		sent = map[string]bool{}
		wg   sync.WaitGroup
	)
	for w, from := range []*pubsub.Node{c.Nodes[0], c.Nodes[1]} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 150 {
				data := msg(w*1000 + i)
				ack, err := from.Publish(ctxT(t), topic, data)
				mu.Lock()
				if err == nil {
					sent[string(data)] = true
				}
				if err == nil && (ack.Delivered != 1 || len(ack.Failures) != 0) {
					bad = append(bad, fmt.Sprintf("%s: %+v", data, ack))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	// Every accepted publish arrived (its ack said so); wait for stragglers
	// of a second owner's copy by publishing one more and seeing it arrive.
	publishUntilAccepted(t, c.Nodes[0], topic, []byte("after"), 1, 10*time.Second)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return slices.Contains(rec.of(s.ID()), "after") }, "the last publish did not arrive")
	got := rec.of(s.ID())[before:]
	counts := map[string]int{}
	for _, m := range got {
		counts[m]++
	}
	for m, k := range counts {
		if k > 1 {
			bad = append(bad, m+" arrived more than once")
		}
	}
	for m := range sent {
		if counts[m] == 0 {
			bad = append(bad, m+" acked Delivered but never arrived")
		}
	}
	if len(bad) > 5 {
		bad = append(bad[:5], "...")
	}
	assert.Empty(t, bad, "%d accepted publishes", len(sent))
	require.NoError(t, s.Err())
}
