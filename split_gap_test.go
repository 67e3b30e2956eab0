package pubsub_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// A broadcast subscriber S on h2 blocks in chunk 0 past h2's
// SubscriberTimeout; each chunk is answered at the publisher's (shorter)
// deadline, S listed Timeout unreported, so S is not skipped. Chunk 1 waits
// in S's mailbox until its delivery's deadline passes: it is never run
// (reported Timeout, to the owner only, after chunk 1's early answer). The
// publisher, not knowing, sends chunk 2, which S then runs: S ran chunks
// 0 and 2 but not 1, though "a subscriber that failed a chunk gets none of
// the later chunks" (README).
func TestSplitBatchEarlyAnswerNoGapAtASlowSubscriber(t *testing.T) {
	r := newSplitRig(t, "split-gap", func(i int) []pubsub.Option {
		if i == 0 {
			return []pubsub.Option{pubsub.WithSubscriberTimeout(250 * time.Millisecond), pubsub.WithRequestTimeout(250 * time.Millisecond)}
		}
		return []pubsub.Option{pubsub.WithSubscriberTimeout(700 * time.Millisecond)}
	})
	r.subscribe(t, 2, "S", func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data[:3]) == splitTag(0) {
			time.Sleep(1300 * time.Millisecond) // past chunk 1's deadline in the mailbox
		}
		return nil
	})
	const count = 4
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	r.endMarker(t)
	t.Logf("ack %+v; S ran %v", ack, r.of("S"))
	assertPrefix(t, r.of("S"), count, "S")
}

// The same root: S's handler fails chunk 0 after the chunk's early answer
// listed it Timeout unreported; the later chunks still reach it and run.
func TestSplitBatchEarlyAnswerNoChunkAfterAFailedOne(t *testing.T) {
	r := newSplitRig(t, "split-gap-err", shortPublisher)
	r.subscribe(t, 2, "S", func(ctx context.Context, m *pubsub.Message) error {
		if string(m.Data[:3]) == splitTag(0) {
			time.Sleep(600 * time.Millisecond)
			return errors.New("fails chunk 0")
		}
		return nil
	})
	const count = 4
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	r.endMarker(t)
	t.Logf("ack %+v; S ran %v", ack, r.of("S"))
	require.Equal(t, []string{splitTag(0)}, r.of("S"), "S failed chunk 0, then ran later chunks of the batch")
}
