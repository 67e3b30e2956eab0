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

// pairOn joins nodes "a" and "b" to the server at url (50 ms heartbeats),
// waits until each sees the other, and returns a topic b owns.
func pairOn(t *testing.T, url string) (a, b *Node, topic string) {
	t.Helper()
	a = joinForTest(t, url, "a", 50*time.Millisecond)
	b = joinForTest(t, url, "b", 50*time.Millisecond)
	waitForTest(t, "views", func() bool { return len(a.view().members) == 2 && len(b.view().members) == 2 })
	return a, b, ownedTopics(a, "b", "t", 1)[0]
}

// outboxPair joins a publisher a and an owner b, subscribes on b to a
// topic b owns, and returns it with the messages b's subscriber received.
func outboxPair(t *testing.T) (a, b *Node, topic string, got func() []string) {
	t.Helper()
	s, err := embedded.StartServer()
	require.NoError(t, err)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() }) // after the nodes' Close (cleanups run last first)
	a, b, topic = pairOn(t, s.ClientURL())
	var mu sync.Mutex
	var msgs []string
	_, err = b.Subscribe(t.Context(), topic, func(_ context.Context, m *Message) error {
		mu.Lock()
		msgs = append(msgs, string(m.Data))
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	return a, b, topic, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), msgs...)
	}
}

func publishNone(ctx context.Context, n *Node, topic, data string) (PublishAck, error) {
	return n.PublishMessages(ctx, topic, []Outgoing{{Data: []byte(data)}}, WithAck(AckNone))
}

func wantMessages(count int) []string {
	want := make([]string, count)
	for i := range want {
		want[i] = fmt.Sprint(i)
	}
	return want
}

// An outbox holds at most its limits of messages and bytes: while a
// request is being written, a call that would pass them waits within its
// ctx and fails with ErrQueueFull (counted in Rejected, the outbox
// unchanged); one whose ctx allows writes what the outbox holds itself
// once the write ends. Every accepted message arrives, in order.
func TestAckNoneOutboxIsBounded(t *testing.T) {
	a, _, topic, got := outboxPair(t)
	a.publisher.out.limits = outboxLimits{msgs: 8, bytes: 1 << 20, nodeBytes: 64 << 20, boxes: 16}
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{} // a write in progress: nothing leaves the outbox
	for i := range 8 {
		ack, err := publishNone(t.Context(), a, topic, fmt.Sprint(i))
		require.NoError(t, err)
		assert.Equal(t, PublishAck{Topic: topic, Status: Accepted, Messages: 1, Level: AckNone}, ack)
	}
	held := func() (msgs, bytes, run int) {
		ob.mu.Lock()
		defer ob.mu.Unlock()
		return ob.msgs, ob.bytes, ob.cur.count
	}
	msgs, bytes, run := held()
	assert.Equal(t, 8, msgs)
	assert.Equal(t, 8*2, bytes, "packed: a length byte and a digit each")
	assert.Equal(t, 8, run, "merged into one request")

	short, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	ack, err := publishNone(short, a, topic, "lost")
	require.ErrorIs(t, err, ErrQueueFull)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, Rejected, ack.Status)
	assert.Equal(t, ReasonQueueFull, ack.Reason)
	assert.Equal(t, uint64(1), a.Stats().Rejected)
	msgs, bytes, _ = held()
	assert.Equal(t, 8, msgs, "a refused call adds nothing")

	// The byte limit binds alike.
	a.publisher.out.limits = outboxLimits{msgs: 100, bytes: 8*2 + 1, nodeBytes: 64 << 20, boxes: 16}
	short2, cancel2 := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel2()
	_, err = publishNone(short2, a, topic, "xx")
	require.ErrorIs(t, err, ErrQueueFull)
	assert.Equal(t, 8*2, bytes)

	// A call with room in its ctx proceeds once the write in progress ends.
	a.publisher.out.limits = outboxLimits{msgs: 8, bytes: 1 << 20, nodeBytes: 64 << 20, boxes: 16}
	done := make(chan error, 1)
	go func() {
		_, err := publishNone(t.Context(), a, topic, "8")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a call past the limit returned (%v) while the outbox was full", err)
	case <-time.After(20 * time.Millisecond):
	}
	ob.unhold() // the write ends
	require.NoError(t, <-done)
	waitForTest(t, "every accepted message", func() bool { return len(got()) == 9 })
	assert.Equal(t, wantMessages(9), got())
	waitForTest(t, "the outbox forgotten once idle", func() bool { return a.publisher.out.lookup(topic) == nil })
}

// Close writes the merged publishes its outboxes hold before it leaves,
// and leaves no flusher behind.
func TestCloseWritesMergedAckNonePublishes(t *testing.T) {
	a, _, topic, got := outboxPair(t)
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{} // hold them in the outbox until Close runs
	const count = 100
	for i := range count {
		_, err := publishNone(t.Context(), a, topic, fmt.Sprint(i))
		require.NoError(t, err)
	}
	closed := make(chan error, 1)
	go func() { closed <- a.Close(t.Context()) }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) before the outbox could be written", err)
	case <-time.After(20 * time.Millisecond):
	}
	ob.unhold()
	require.NoError(t, <-closed)
	waitForTest(t, "every merged message", func() bool { return len(got()) == count })
	assert.Equal(t, wantMessages(count), got())
	assert.Zero(t, a.Stats().Rejected)
	a.life.goroutines.mu.Lock()
	assert.Zero(t, a.life.goroutines.n, "goroutines left after Close")
	a.life.goroutines.mu.Unlock()
	_, err := publishNone(t.Context(), a, topic, "late")
	require.ErrorIs(t, err, ErrClosed)
}

// A Close whose ctx ends before the outboxes are written says so: their
// messages were accepted, and are lost (counted in Rejected).
func TestCloseCutShortBeforeTheOutboxIsWrittenSaysSo(t *testing.T) {
	a, _, topic, _ := outboxPair(t)
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{} // a write that outlasts Close's ctx
	defer ob.unhold()
	for i := range 5 {
		_, err := publishNone(t.Context(), a, topic, fmt.Sprint(i))
		require.NoError(t, err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Millisecond)
	defer cancel()
	err := a.Close(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "5 messages not written")
	waitForTest(t, "the unwritten messages counted", func() bool { return a.Stats().Rejected == 5 })
}

// A node stopped underneath (its connection lost) cannot write what its
// outboxes hold: the flusher drops it, counted in Rejected, and ends.
func TestAckNoneOutboxDropsCountedWhenTheNodeStops(t *testing.T) {
	a, _, topic, _ := outboxPair(t)
	ob := a.publisher.out.get(topic)
	ob.sending <- struct{}{}
	defer ob.unhold()
	for i := range 5 {
		_, err := publishNone(t.Context(), a, topic, fmt.Sprint(i))
		require.NoError(t, err)
	}
	a.connectionLost()
	waitForTest(t, "the held messages counted", func() bool { return a.Stats().Rejected == 5 })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	require.NoError(t, a.life.goroutines.wait(ctx), "the flusher ended")
}
