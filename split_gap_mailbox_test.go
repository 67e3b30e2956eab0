package pubsub_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
)

// fullHook opens a gate at the second MailboxFull its node reports: the
// first says S's mailbox is full, the second that chunk 0 was refused.
type fullHook struct {
	full atomic.Int64
	g    atomic.Pointer[gate]
}

func (h *fullHook) OnHandled(i pubsub.HandledInfo) {
	if i.Status == pubsub.MailboxFull && h.full.Add(1) == 2 {
		if g := h.g.Load(); g != nil {
			g.open()
		}
	}
}

// S on h2 (a mailbox of one batch) is busy with a plain publish and has
// one more queued when chunk 0 of a split batch arrives: refused,
// MailboxFull. S2, beside it on h2, runs chunk 0 past the publisher's
// deadline, so h2's report comes after chunk 0's early answer, which lists
// S Timeout (unreported): S is not skipped. S is let go at once and chunk
// 1 finds its mailbox empty. S never ran chunk 0, so it must run none of
// the later chunks ('a subscriber that failed a chunk gets none of the
// later chunks'); the gate had no mark of the batch at S (a refused
// delivery never reaches the mailbox) and let chunk 1 run as a first one.
func TestSplitBatchEarlyAnswerNoChunkAfterAMailboxFullOne(t *testing.T) {
	hook := &fullHook{}
	r := newSplitRig(t, "split-gap-full", func(i int) []pubsub.Option {
		o := shortPublisher(i)
		if i == 2 {
			o = append(o, pubsub.WithHooks(hook))
		}
		return o
	})
	held := newGate(t)
	hook.g.Store(held)
	in := make(chan struct{}, 3)
	subS := r.subscribe(t, 2, "S", func(ctx context.Context, m *pubsub.Message) error {
		if strings.HasPrefix(string(m.Data), "b") {
			in <- struct{}{}
			<-held.ch
		}
		return nil
	}, pubsub.WithSubscriptionMailbox(1))
	subS2 := r.subscribe(t, 2, "S2", func(ctx context.Context, m *pubsub.Message) error {
		if strings.HasPrefix(string(m.Data), splitTag(0)) {
			time.Sleep(600 * time.Millisecond) // past the publisher's deadline
		}
		return nil
	})
	// b0 runs (held), b1 waits, b2 is refused: S's mailbox is full.
	for _, b := range []string{"b0", "b1", "b2"} {
		_, err := r.nodes[1].PublishMessages(ctxT(t), r.topic, []pubsub.Outgoing{{Data: []byte(b)}}, pubsub.WithAck(pubsub.AckAccepted))
		require.NoError(t, err)
		if b == "b0" {
			select {
			case <-in:
			case <-time.After(5 * time.Second):
				t.Fatal("S never ran b0")
			}
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for hook.full.Load() < 1 {
		require.True(t, time.Now().Before(deadline), "S's mailbox never filled")
		time.Sleep(5 * time.Millisecond) // polling for the condition, with a deadline
	}
	const count = 4
	ack, err := r.nodes[0].PublishMessages(ctxT(t), r.topic, r.splitBatch(count, 1))
	require.NoError(t, err)
	r.endMarker(t)
	require.NoError(t, subS.Err())
	require.NoError(t, subS2.Err())
	t.Logf("ack %+v; S ran %v; S2 ran %v; refusals %d", ack, r.of("S"), r.of("S2"), hook.full.Load())
	require.EqualValues(t, 2, hook.full.Load(), "chunk 0 was not the one refused at S: the test did not set up its case")
	require.Empty(t, r.of("S"), "S's mailbox refused chunk 0, then S ran later chunks of the batch")
}
