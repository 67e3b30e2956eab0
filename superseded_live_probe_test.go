package pubsub_test

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A live node whose heartbeats are held for three heartbeat intervals (a
// GC pause, a loaded machine: far below MemberTimeout) while a second node
// joins with its ID. Peers replace a member silent for two intervals by a
// newer incarnation (a restart looks like that), so the joiner takes the
// live node's place; the joiner hears nothing from the held node, so its
// Join succeeds. After the stall the live node must either receive again
// or end its subscription with an error saying why (guarantee 9). Before,
// it did neither, silently, for as long as the joiner ran (5 of 5 runs):
// no peer tells an incarnation it replaced without timing it out. Now the
// live node, hearing the joiner and seeing its peers report the joiner in
// its place for MemberTimeout, stops, its subscription ended with an error
// that says so (replaced.go: noteReplacedView).
func TestLiveNodeBrieflyQuietKeepsItsIDAgainstAJoiner(t *testing.T) {
	leakcheck.Parallel(t)

	c := testcluster.NewFaulty(t, 3, 3, fast...)
	c.WaitConverged(t, 10*time.Second)
	topic := ownedBy(t, c.Nodes[0], "live-dup")
	rec := newRecorder()
	live := c.Nodes[2]
	sz := subscribe(t, live, topic, rec.handler)
	ack, err := c.Nodes[0].Publish(ctxT(t), topic, msg(0))
	mustAccept(t, ack, err, 1)

	const interval = 50 * time.Millisecond // fast's heartbeat interval
	c.Client(2).Stall(faultnet.Both)
	heal := time.AfterFunc(3*interval, c.HealAll) // the length of the pause
	defer heal.Stop()
	joiner, jerr := pubsub.Join(ctxT(t), c.Connect(t, 2), append(fast, pubsub.WithNodeID("n2"))...)
	if jerr == nil {
		defer func() { require.NoError(t, joiner.Close(ctxT(t))) }()
	}
	t.Logf("joiner's Join: %v", jerr)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return c.Client(2).Stalled() == 0 }, "not healed")

	// The live node receives again, or its subscription ends with a reason.
	received := false
	deadline := time.Now().Add(5 * time.Second)
	for i := 1; time.Now().Before(deadline) && !received; i++ {
		select {
		case <-sz.Done():
			t.Logf("live node's subscription ended: %v", sz.Err())
			require.ErrorIs(t, sz.Err(), pubsub.ErrClosed)
			require.ErrorContains(t, sz.Err(), "another node joined with its ID")
			return
		default:
		}
		_, _ = c.Nodes[0].Publish(ctxT(t), topic, msg(i))
		received = len(rec.of(sz.ID())) > 1
		if !received {
			time.Sleep(20 * time.Millisecond) // publish pacing, not a wait for a condition
		}
	}
	require.True(t, received || errors.Is(jerr, pubsub.ErrInvalidConfig),
		"5 s after a 150 ms pause the live node's subscription neither receives (%d of its messages) nor ended; joiner's Join: %v; peers' view %v; live node's view %v",
		len(rec.of(sz.ID())), jerr, c.Nodes[0].Members(), live.Members())
	require.True(t, received, "the live node's subscription does not receive again; joiner's Join: %v", jerr)
}
