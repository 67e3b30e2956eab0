package pubsub_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

// fakeOwner joins the cluster as member id by heartbeating, and answers
// every request on its inbox with answer's bytes: what a member built from
// another version of the package, or a broken one, could send.
func fakeOwner(t *testing.T, c *testcluster.Cluster, id string, answer []byte) {
	t.Helper()
	nc := c.Connect(t, 0)
	t.Cleanup(nc.Close)
	sub, err := nc.Subscribe("pubsub.node."+id, func(m *nats.Msg) { _ = m.Respond(answer) })
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, nc.Flush())
	t.Cleanup(heartbeatAs(nc, id))
}

// heartbeatAs heartbeats on nc as incarnation 1 of member id every 50 ms
// until the function it returns is called (once or more).
func heartbeatAs(nc *nats.Conn, id string) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			_ = nc.Publish("pubsub.members", heartbeat(wire.Heartbeat_HEARTBEAT, id, 1, 0))
			select {
			case <-quit:
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit); <-done }) }
}

// topicOwnedBy returns a topic n's view gives to owner.
func topicOwnedBy(t *testing.T, n *pubsub.Node, owner string) string {
	t.Helper()
	return ownedTopic(t, n, owner, "forged-owner")
}

// TestOwnerAnswersThatCannotBeReadWrapASentinel: an owner that answers
// BAD_REQUEST refused the request before acting on it (ErrTopicUnavailable:
// nothing happened); an answer that cannot be decoded leaves the outcome
// unknown (ErrTimeout). Subscribe and Publish say so through errors.Is, and
// a publish's ack carries the matching Reason; Initialize, which changes
// nothing, reports the topic unavailable either way.
func TestOwnerAnswersThatCannotBeReadWrapASentinel(t *testing.T) {
	badRequest, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_BAD_REQUEST, Error: "malformed envelope"}}})
	require.NoError(t, err)
	for _, tc := range []struct {
		name   string
		answer []byte
		want   error
		reason pubsub.Reason
	}{
		{"bad request", badRequest, pubsub.ErrTopicUnavailable, pubsub.ReasonTopicUnavailable},
		{"unreadable", []byte{0xff, 0xff, 0xff}, pubsub.ErrTimeout, pubsub.ReasonTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, 1, pubsub.WithRequestTimeout(500*time.Millisecond))
			n := c.Nodes[0]
			fakeOwner(t, c, "zz-fake", tc.answer)
			testcluster.WaitFor(t, 5*time.Second, func() bool { return len(n.Members()) == 2 }, "the fake member never joined the view")
			topic := topicOwnedBy(t, n, "zz-fake")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()

			s, err := n.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil })
			assert.Nil(t, s)
			assert.ErrorIs(t, err, tc.want, "Subscribe: %v", err)

			ack, err := n.Publish(ctx, topic, []byte("x"))
			assert.ErrorIs(t, err, tc.want, "Publish: %v", err)
			assert.Equal(t, pubsub.Rejected, ack.Status)
			assert.Equal(t, tc.reason, ack.Reason)

			// Initialize changes nothing at the owner: whatever the answer,
			// the topic was not made ready.
			err = n.Initialize(ctx, topic)
			assert.ErrorIs(t, err, pubsub.ErrTopicUnavailable, "Initialize: %v", err)
			assert.False(t, errors.Is(err, context.DeadlineExceeded), "the caller's ctx did not end: %v", err)
		})
	}
}

// Regression (review): a member answering the sync pull with a page that
// does not move past the cursor it was asked for (a broken or foreign
// member) had the puller ask for the same page, and keep it, for as long
// as the view lasted: memory without bound. The pull now stops there,
// keeps the pages before it, and counts the page as malformed.
func TestSyncPullStopsAtAPageThatDoesNotAdvance(t *testing.T) {
	page, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Reply{Reply: &wire.Reply{Code: wire.Reply_OK, Sync: &wire.Sync{
		From: &wire.MemberRef{NodeId: "zz-fake", Incarnation: 1}, More: true,
		Topics: []*wire.TopicSubscribers{{Topic: "same-page", Subscribers: []string{"s1"}}},
	}}}})
	require.NoError(t, err)
	c := newCluster(t, 1, 1)
	n := c.Nodes[0]
	fakeOwner(t, c, "zz-fake", page)
	testcluster.WaitFor(t, 5*time.Second, func() bool { return len(n.Members()) == 2 }, "the fake member never joined the view")
	testcluster.WaitFor(t, 5*time.Second, func() bool { return n.Stats().Malformed > 0 }, "the pull never stopped at the repeated page")
	servesEveryone(t, c, 3*time.Second)
}
