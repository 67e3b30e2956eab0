package pubsub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// Found by a probe: a producer its user never closed kept its goroutine
// after its node closed, for good (the cluster's leak check at cleanup
// fails on it). It now stops with its node: what it still holds completes
// ReasonClosed, and Produce afterwards fails ErrClosed at once.
func TestProducerStopsWhenItsNodeCloses(t *testing.T) {
	c := newCluster(t, 2, 2)
	topic := ownedBy(t, c.Nodes[1], "node-closes")
	subscribe(t, c.Nodes[1], topic, func(context.Context, *pubsub.Message) error { return nil })

	idle, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{})
	require.NoError(t, err)
	ack, err := idle.Produce(ctxT(t), []byte("sent")).Wait(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, 1, ack.Delivered)
	// Never sent: the batch lingers for an hour.
	lingering, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{Linger: time.Hour})
	require.NoError(t, err)
	queued := lingering.Produce(ctxT(t), []byte("queued"))
	typed, err := pubsub.NewTopic(c.Nodes[0], topic, pubsub.JSONCodec[string]())
	require.NoError(t, err)
	tp, err := pubsub.NewTypedProducer(typed, pubsub.ProducerConfig{})
	require.NoError(t, err)

	c.CloseNode(t, 0) // none of the three producers is closed

	select {
	case <-queued.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the queued message's future did not complete when its node closed")
	}
	ack, err = queued.Wait(ctxT(t))
	require.ErrorIs(t, err, pubsub.ErrClosed)
	assert.Equal(t, pubsub.ReasonClosed, ack.Reason, "never sent: not published")
	// The error names the producer's topic and says its node closed it:
	// its user never called Close.
	assert.Contains(t, err.Error(), topic)
	assert.Contains(t, err.Error(), "its node closed")
	for name, f := range map[string]*pubsub.Produced{"idle": idle.Produce(ctxT(t), []byte("late")), "typed": tp.Produce(ctxT(t), "late")} {
		select {
		case <-f.Done():
			_, err := f.Wait(ctxT(t))
			assert.True(t, errors.Is(err, pubsub.ErrClosed), "%s: %v", name, err)
			assert.Contains(t, err.Error(), "its node closed", name)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: Produce after its node closed did not complete", name)
		}
	}
	// A Close afterwards has nothing left to do.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	assert.NoError(t, lingering.Close(ctx))
}

// Found in review of b59c400: once its node ended a producer's lifetime
// and the producer abandoned what it held, a later Close with a ctx that
// had already ended returned nil or ctx's error at random (Close's select
// between the actor's exit, long done, and ctx's Done). The producer had
// stopped before that Close: it has nothing to give up, so nil, as with a
// live ctx (TestProducerStopsWhenItsNodeCloses).
func TestProducerStoppedByItsNodeClosesNilWhateverCtx(t *testing.T) {
	c := newCluster(t, 1, 2)
	topic := ownedBy(t, c.Nodes[1], "node-closes-ctx")
	var ps []*pubsub.BatchingProducer
	var queued []*pubsub.Produced
	for range 20 {
		p, err := pubsub.NewBatchingProducer(c.Nodes[0], topic, pubsub.ProducerConfig{Linger: time.Hour})
		require.NoError(t, err)
		ps = append(ps, p)
		queued = append(queued, p.Produce(ctxT(t), []byte("queued")))
	}
	c.CloseNode(t, 0)
	for i, f := range queued {
		ack, err := f.Wait(ctxT(t))
		require.ErrorIs(t, err, pubsub.ErrClosed, "producer %d", i)
		require.Equal(t, pubsub.ReasonClosed, ack.Reason, "producer %d", i)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for i, p := range ps {
		assert.NoError(t, p.Close(done), "producer %d: stopped by its node before this Close", i)
	}
}

// Found in review of 44e8c5b: a producer's attempt that the lifetime's end
// interrupted while its node was still looking for an owner (every try
// refused or reaching none) returns ErrTopicUnavailable wrapping
// context.Canceled: nothing was published, as the README says of
// ReasonTopicUnavailable. But reasonOf makes it ReasonCancelled, which
// onEvent reads as Close's abort of a batch in flight, and the message
// completed ReasonTimeout ("subscribers may have run it") instead of
// ReasonClosed: whether Close gave up or the node closed under an
// unclosed producer. Here no member may own a topic, so the first
// attempt's Initialize looks for an owner until the lifetime ends.
func TestProducerInterruptedLookingForAnOwnerIsNotPublished(t *testing.T) {
	c := newCluster(t, 1, 2, pubsub.WithClientOnly(), pubsub.WithRequestTimeout(time.Minute))
	check := func(t *testing.T, f *pubsub.Produced) {
		t.Helper()
		ack, err := f.Wait(ctxT(t))
		require.ErrorIs(t, err, pubsub.ErrClosed)
		assert.Equal(t, pubsub.ReasonClosed, ack.Reason, "nothing was published: %v", err)
	}
	t.Run("close gives up", func(t *testing.T) {
		p, err := pubsub.NewBatchingProducer(c.Nodes[0], "no-owner", pubsub.ProducerConfig{})
		require.NoError(t, err)
		f := p.Produce(ctxT(t), []byte("x"))
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		require.ErrorIs(t, p.Close(ctx), context.DeadlineExceeded)
		check(t, f)
	})
	t.Run("node closes", func(t *testing.T) {
		p, err := pubsub.NewBatchingProducer(c.Nodes[1], "no-owner", pubsub.ProducerConfig{})
		require.NoError(t, err)
		f := p.Produce(ctxT(t), []byte("x"))
		c.CloseNode(t, 1)
		check(t, f)
	})
}
