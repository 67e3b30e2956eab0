package pubsub

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// ownerAndPublisher starts a NATS server and joins two nodes to it, "owner"
// and "pub", with opts, once each sees the other.
func ownerAndPublisher(t *testing.T, opts ...Option) (owner, pub *Node) {
	t.Helper()
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() }) // after the nodes' Close (cleanups run last first)
	owner = joinWithForTest(t, s.ClientURL(), "owner", opts...)
	pub = joinWithForTest(t, s.ClientURL(), "pub", opts...)
	waitForTest(t, "views", func() bool { return len(owner.view().members) == 2 && len(pub.view().members) == 2 })
	return owner, pub
}

// ownedTopics returns count topics named prefix-N that member ownerID owns
// in n's view.
func ownedTopics(n *Node, ownerID, prefix string, count int) []string {
	var topics []string
	for i := 0; len(topics) < count; i++ {
		if tp := fmt.Sprintf("%s-%d", prefix, i); n.view().ownerOf(tp).ID == ownerID {
			topics = append(topics, tp)
		}
	}
	return topics
}

// Regression: a publish request that passed the owner's inbox drain check
// just before a graceful Close began, and still sat in its topic actor's
// queue, was not waited for (the drain only counted batches the actor had
// started): the owner left, and the publisher got ErrTimeout although
// nothing failed (TestGracefulLeaveDrains, about one run in 40). Here the
// owner's actor is held busy so the request waits in its queue while
// Close starts; Close must wait for it and the publish must be accepted.
func TestGracefulCloseServesRequestsQueuedBeforeTheDrain(t *testing.T) {
	owner, pub := ownerAndPublisher(t, WithHeartbeatInterval(50*time.Millisecond), WithMemberTimeout(2*time.Second),
		WithRequestTimeout(3*time.Second), WithSubscriberTimeout(2*time.Second))
	topic := ownedTopics(pub, "owner", "q", 1)[0]
	delivered := make(chan struct{}, 1)
	_, err := pub.Subscribe(t.Context(), topic, func(context.Context, *Message) error {
		delivered <- struct{}{}
		return nil
	})
	require.NoError(t, err)

	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)                                                    // a failed wait below must not leave the actor blocked
	owner.owner.onActor(topic, false, func(*topicActor) { <-release }) // the actor is busy
	type result struct {
		ack PublishAck
		err error
	}
	published := make(chan result, 1)
	go func() {
		ack, err := pub.Publish(t.Context(), topic, []byte("queued before the drain"))
		published <- result{ack, err}
	}()
	waitForTest(t, "the request queued on the owner's actor", func() bool { return owner.owner.queued.Load() == 1 })

	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		closed <- owner.Close(ctx)
	}()
	waitForTest(t, "the drain began", owner.life.drain.on.Load)
	// Before the fix Close returned within milliseconds: its peer took its
	// handover at once and nothing counted the queued request.
	assert.Never(t, func() bool { return len(closed) > 0 }, 300*time.Millisecond, 10*time.Millisecond,
		"Close left while a publish request waited in its actor's queue")
	free()
	r := <-published
	require.NoError(t, r.err, "the publish queued before the drain")
	assert.Equal(t, 1, r.ack.Delivered)
	<-delivered
	require.NoError(t, <-closed)
}
