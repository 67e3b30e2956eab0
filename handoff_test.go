package pubsub_test

// Handoff under asymmetric view changes (finding 1) and large subscription
// sets (finding 2).

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// subscribeEverywhere subscribes every node to count topics named
// prefix-<i> and returns the topics.
func subscribeEverywhere(t *testing.T, c *testcluster.Cluster, rec *recorder, prefix string, count int) []string {
	t.Helper()
	topics := make([]string, count)
	for i := range topics {
		topics[i] = fmt.Sprintf("%s-%d", prefix, i)
		for _, n := range c.Nodes {
			subscribe(t, n, topics[i], rec.handler)
		}
	}
	return topics
}

// everyTopicReachesAll publishes to every topic from node from until each is
// accepted with want deliveries and no failure.
func everyTopicReachesAll(t *testing.T, c *testcluster.Cluster, from int, topics []string, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, topic := range topics {
		publishUntilAccepted(t, c.Nodes[from], topic, []byte("after-"+topic), want, time.Until(deadline))
	}
}

func memberOf(t *testing.T, n *pubsub.Node, id string) pubsub.Member {
	t.Helper()
	m, ok := lookupMember(n, id)
	if !ok {
		t.Fatalf("%s does not see %s", n.ID(), id)
	}
	return m
}

func lookupMember(n *pubsub.Node, id string) (pubsub.Member, bool) {
	for _, m := range n.Members() {
		if m.ID == id {
			return m, true
		}
	}
	return pubsub.Member{}, false
}

// A forged LEAVE of a live member makes its peers drop and re-add it while
// its own view never changes. Before owners pulled subscriptions, the member
// never re-sent them: topics its peers gained stayed NOT_READY and its
// subscribers were silently left out of topics they kept.
func TestForgedLeaveOfALiveMemberHeals(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	rec := newRecorder()
	topics := subscribeEverywhere(t, c, rec, "flap", 30)
	everyTopicReachesAll(t, c, 0, topics, 3, 5*time.Second)

	left := make(chan struct{}, 1)
	cancel := c.Nodes[0].Events().Subscribe(func(e pubsub.Event) {
		if l, ok := e.(pubsub.MemberLeft); ok && l.Member.ID == "n2" {
			select {
			case left <- struct{}{}:
			default:
			}
		}
	})
	defer cancel()
	n2 := memberOf(t, c.Nodes[0], "n2")
	raw := c.Connect(t, 0)
	require.NoError(t, raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_LEAVE, "n2", n2.Incarnation, 0)))
	require.NoError(t, raw.Flush())
	select {
	case <-left:
	case <-time.After(5 * time.Second):
		t.Fatal("the forged LEAVE did not make n0 drop n2")
	}
	c.WaitConverged(t, 5*time.Second)
	everyTopicReachesAll(t, c, 0, topics, 3, 2*2*time.Second)
	everyTopicReachesAll(t, c, 1, topics, 3, 2*time.Second)
}

// A forged heartbeat with a member's incarnation + 1 used to make peers take
// it for a restart, ignoring the real member's heartbeats as stale until the
// forged one timed out. A newer incarnation now replaces only an older one
// that has fallen silent, so the forgery changes nothing.
func TestForgedNewerIncarnationOfALiveMemberIsIgnored(t *testing.T) {
	// "Silent" is 2 heartbeat intervals: with fast's 50 ms, a loaded
	// machine delaying n2's heartbeats at a peer by 100 ms let a forged
	// one replace n2 there, dropping its subscriptions while the forger
	// kept at it (acks Delivered 2 of 3, no failure). 250 ms gives 500 ms.
	c := newCluster(t, 3, 3, pubsub.WithHeartbeatInterval(250*time.Millisecond))
	rec := newRecorder()
	topics := subscribeEverywhere(t, c, rec, "reinc", 20)
	n2 := memberOf(t, c.Nodes[0], "n2")
	raw := c.Connect(t, 0)
	// The forger keeps at it while the topics are checked: heartbeats of
	// a newer n2, which n2 hears itself, and notices in its peers' names
	// that they serve that one now. Neither peer timed n2 out, nor do its
	// peers' heartbeats report such a view: n2 must not stop (replaced.go).
	var notices [][]byte
	for _, from := range c.Nodes[:2] {
		me := memberOf(t, c.Nodes[2], from.ID())
		notice, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
			Kind: wire.Heartbeat_JOIN_REPLY, From: &wire.MemberRef{NodeId: me.ID, Incarnation: me.Incarnation},
			Members: []*wire.MemberRef{{NodeId: "n2", Incarnation: n2.Incarnation + 1}}}}})
		require.NoError(t, err)
		notices = append(notices, notice)
	}
	stop, forged := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(forged)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			_ = raw.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, "n2", n2.Incarnation+1, 0))
			for _, notice := range notices {
				_ = raw.Publish("pubsub.node.n2", notice)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	everyTopicReachesAll(t, c, 0, topics, 3, 2*2*time.Second)
	close(stop)
	<-forged
	_, err := c.Nodes[2].Publish(ctxT(t), topics[0], []byte("still up"))
	require.NoError(t, err, "n2 stopped on forged notices")
	for _, n := range c.Nodes {
		m, ok := lookupMember(n, "n2")
		require.True(t, ok, "%s lost n2", n.ID())
		require.Equal(t, n2.Incarnation, m.Incarnation, "%s took the forged incarnation", n.ID())
	}
}

// Subscriptions that do not fit in one NATS message are pulled in pages. A
// crash then moves thousands of topics whose subscriber lists span pages.
func TestSubscriptionsLargerThanOneMessageMoveAfterACrash(t *testing.T) {
	leakcheck.Parallel(t)
	c := newCluster(t, 3, 3)
	const count = 5000
	name := strings.Repeat("x", 200)
	topics := make([]string, count)
	for i := range topics {
		topics[i] = fmt.Sprintf("big-%05d-%s", i, name)
	}
	// Each survivor subscribes to every topic: 5000 x ~215 bytes per node,
	// more than one NATS message (and two of the half-megabyte pages a sync
	// answer holds). 10 000 subscribe calls took 13 s alone under -race and
	// past ctxT's 20 s beside another copy of the suite: four callers per
	// node, and a bound for the whole set-up, not for a call.
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const callers = 4
	var wg sync.WaitGroup
	errs := make(chan error, 2*callers)
	for _, n := range c.Nodes[1:] {
		for w := range callers {
			wg.Go(func() {
				for i := w; i < len(topics); i += callers {
					if _, err := n.Subscribe(ctx, topics[i], func(context.Context, *pubsub.Message) error { return nil }); err != nil {
						errs <- err
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	require.NoError(t, <-errs)
	var moved []string
	for _, topic := range topics {
		if m, _ := c.Nodes[1].OwnerOf(topic); m.ID == "n0" {
			moved = append(moved, topic)
		}
	}
	require.NotEmpty(t, moved)
	crashed := time.Now()
	c.Crash(0)
	c.WaitConverged(t, 5*time.Second)
	// Every moved topic serves both survivors' subscribers.
	for _, topic := range moved {
		publishUntilAccepted(t, c.Nodes[1], topic, []byte("after"), 2, 5*time.Second)
	}
	t.Logf("%d moved topics served again %v after the crash", len(moved), time.Since(crashed))
}
