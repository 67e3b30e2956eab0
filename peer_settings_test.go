package pubsub_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// syncBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestPeersWithSettingsThatCannotWorkAreReported: a member running another
// PartitionPolicy, or heartbeating more than half a peer's MemberTimeout
// apart, is counted (Stats().SettingsMismatches) and logged by the peer
// that notices; members that agree are not.
func TestPeersWithSettingsThatCannotWorkAreReported(t *testing.T) {
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c := newCluster(t, 1, 1, append(fast, pubsub.WithLogger(logger))...)
	n0 := c.Nodes[0]
	c.AddNode(t, "same", 0, fast...)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(n0.Members()) == 2 }, "same did not join")
	assert.Zero(t, n0.Stats().SettingsMismatches, "a member with the same settings")

	c.AddNode(t, "majority", 0, append(fast, pubsub.WithPartitionPolicy(pubsub.KeepMajority))...)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return n0.Stats().SettingsMismatches == 1 }, "another PartitionPolicy not counted")
	c.AddNode(t, "slow", 0, pubsub.WithHeartbeatInterval(1500*time.Millisecond), pubsub.WithMemberTimeout(6*time.Second))
	testcluster.WaitFor(t, 10*time.Second, func() bool { return n0.Stats().SettingsMismatches >= 2 }, "a heartbeat interval past half the MemberTimeout not counted")
	out := logs.String()
	assert.True(t, strings.Contains(out, "member runs another PartitionPolicy") && strings.Contains(out, "member=majority"), "no warning naming the KeepMajority member:\n%s", out)
	assert.True(t, strings.Contains(out, "member heartbeats too seldom") && strings.Contains(out, "member=slow"), "no warning naming the slow member:\n%s", out)
	assert.NotContains(t, out, "member=same", "a member with the same settings was warned about")
}
