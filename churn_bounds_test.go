package pubsub_test

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

func churnHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

func ownerSubscribers(n *pubsub.Node) int {
	total := 0
	for _, c := range n.Stats().Subscribers {
		total += c
	}
	return total
}

// A Subscribe whose ctx ends after its request reached the owner fails and
// leaves nothing on the subscriber's node; the owner must not keep the
// subscriber it recorded for it either.
func TestCancelledSubscribeLeavesNoSubscriberAtTheOwner(t *testing.T) {
	c := newCluster(t, 1, 2)
	owner, sub := c.Nodes[0], c.Nodes[1]
	// The owner's listener cancels the pending Subscribe once the owner
	// recorded it: the answer is then on its way back.
	canceller := cancelOnAdded(t, owner)
	const topics = 300
	failed := 0
	heap0 := churnHeap()
	for i := range topics {
		topic := ownedBy(t, owner, fmt.Sprintf("cancelled-%d", i))
		ctx, cancel := canceller.arm(topic)
		s, err := sub.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil })
		cancel()
		if err != nil {
			failed++
			continue
		}
		if err := s.Unsubscribe(ctxT(t)); err != nil {
			t.Fatalf("unsubscribe: %v", err)
		}
	}
	t.Logf("%d of %d Subscribes failed for their cancelled ctx; heap %+d KB", failed, topics, (int64(churnHeap())-int64(heap0))/1024)
	if failed == 0 {
		t.Skip("no Subscribe was cancelled in flight")
	}
	if got := sub.Stats().Subscriptions; got != 0 {
		t.Fatalf("subscriber node holds %d subscriptions, want 0", got)
	}
	testcluster.WaitFor(t, 10*time.Second, func() bool { return ownerSubscribers(owner) == 0 },
		"owner still records %d subscribers (%d topics owned) for %d failed Subscribes", ownerSubscribers(owner), owner.Stats().TopicsOwned, failed)
}

// logLines records a node's log messages and their attributes.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) Enabled(context.Context, slog.Level) bool { return true }
func (l *logLines) Handle(_ context.Context, r slog.Record) error {
	line := r.Message
	r.Attrs(func(a slog.Attr) bool { line += " " + a.String(); return true })
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	return nil
}
func (l *logLines) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logLines) WithGroup(string) slog.Handler      { return l }

func (l *logLines) matching(sub string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return out
}

// A listener stuck in its callback loses every event past its buffer. It
// is told so only by an EventsDropped it receives once it returns: stuck
// for good, nobody is. The drops must be counted and logged where the
// operator looks (Stats, the node's log), as every drop is.
func TestStuckListenerDropsAreCountedAndLogged(t *testing.T) {
	logs := &logLines{}
	c := newCluster(t, 1, 1, pubsub.WithLogger(slog.New(logs)), pubsub.WithMetricsInterval(0))
	n := c.Nodes[0]
	release := make(chan struct{})
	entered := make(chan struct{})
	var once sync.Once
	cancel := n.Events().Subscribe(func(pubsub.Event) {
		once.Do(func() { close(entered) })
		<-release
	})
	// Released before the cluster's cleanup checks for leaks.
	t.Cleanup(func() { close(release); cancel() })
	topic := ownedBy(t, n, "stuck-listener")
	subscribe(t, n, topic, newRecorder().handler)
	<-entered
	ctx := ctxT(t)
	const publishes = pubsub.EventBufferSize // two events each on the owner
	for i := range publishes {
		ack, err := n.Publish(ctx, topic, msg(i))
		mustAccept(t, ack, err, 1)
	}
	// The stuck callback holds the SubscriberAdded; of the 2 x publishes
	// events after it, EventBufferSize are buffered.
	lost := uint64(2*publishes - pubsub.EventBufferSize)
	lines := logs.matching("dropped")
	if len(lines) == 0 {
		t.Fatalf("a listener stuck in its callback lost %d events: no log line says so", lost)
	}
	if got := n.Stats().EventsDropped; got < lost {
		t.Errorf("Stats().EventsDropped = %d, want at least %d", got, lost)
	}
	t.Logf("logged: %q", lines)
}

// A listener's buffer is bounded in events, but a MetricsSnapshot carries
// Stats, whose Subscribers map holds every topic the node owns: a stuck (or
// slow) listener's 1024 snapshots of a node owning T topics hold 1024
// copies of that map. Here 2 000 topics: ~130 MB before the fix.
func TestStuckListenerDoesNotHoldASnapshotPerMetricsInterval(t *testing.T) {
	c := newCluster(t, 1, 1, pubsub.WithMetricsInterval(time.Millisecond))
	n := c.Nodes[0]
	ctx := ctxT(t)
	const topics = 2000
	for i := range topics {
		if _, err := n.Subscribe(ctx, fmt.Sprintf("snap-%d", i), func(context.Context, *pubsub.Message) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	base := churnHeap()
	release := make(chan struct{})
	entered := make(chan struct{})
	var once sync.Once
	cancel := n.Events().Subscribe(func(pubsub.Event) { once.Do(func() { close(entered) }); <-release })
	t.Cleanup(func() { close(release); cancel() })
	<-entered
	// Past a full buffer's worth of snapshots.
	testcluster.WaitFor(t, 60*time.Second, func() bool { return n.Stats().EventsDropped > pubsub.EventBufferSize }, "snapshots past the buffer")
	grown := (int64(churnHeap()) - int64(base)) >> 20
	t.Logf("a stuck listener, %d owned topics: heap %+d MB", topics, grown)
	if grown > 16 {
		t.Fatalf("a stuck listener's buffered snapshots hold %d MB (%d owned topics)", grown, topics)
	}
}

// A consumer group whose members all vanished (their node crashed) is
// reported SubscriberGone by every batch until a member joins. A new
// member whose Subscribe then fails (its ctx ended after the owner
// recorded it) joined nothing: the group is still gone, and acks must keep
// saying so. The unsubscribe the failed Subscribe sends the owner
// (forgetAtOwner) must not end the group as if its last member had
// unsubscribed, silently.
func TestCancelledSubscribeKeepsAVanishedGroupReported(t *testing.T) {
	c := newCluster(t, 1, 3)
	owner, sub := c.Nodes[0], c.Nodes[1]
	const topics = 10
	names := make([]string, topics)
	for i := range names {
		names[i] = ownedBy(t, owner, fmt.Sprintf("vanished-%d", i))
		if _, err := c.Nodes[2].Subscribe(ctxT(t), names[i], func(context.Context, *pubsub.Message) error { return nil }, pubsub.WithGroup("gone")); err != nil {
			t.Fatal(err)
		}
	}
	c.Crash(2)
	c.WaitConverged(t, 10*time.Second, 0, 1)
	vanished := func(topic string) (pubsub.PublishAck, bool) {
		ack, err := owner.Publish(ctxT(t), topic, []byte("m"))
		return ack, err == nil && slices.Contains(ack.Failures, pubsub.DeliveryFailure{Group: "gone", Status: pubsub.SubscriberGone})
	}
	for _, topic := range names {
		testcluster.WaitFor(t, 10*time.Second, func() bool { _, ok := vanished(topic); return ok }, "group on %s never reported gone", topic)
	}
	canceller := cancelOnAdded(t, owner)
	failed := 0
	for _, topic := range names {
		ctx, cancel := canceller.arm(topic)
		s, err := sub.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error { return nil }, pubsub.WithGroup("gone"))
		cancel()
		if err == nil {
			_ = s // it joined: the group is back, and ends by its unsubscribe
			continue
		}
		failed++
		// Once the owner forgot the failed member (told, or a delivery
		// found it gone), the group is gone again, and said so.
		testcluster.WaitFor(t, 10*time.Second, func() bool {
			_, _ = owner.Publish(ctxT(t), topic, []byte("m"))
			return owner.Stats().Subscribers[topic] == 0
		}, "owner still holds the failed member on %s", topic)
		if ack, ok := vanished(topic); !ok {
			t.Errorf("%s: after a failed Subscribe to the vanished group, ack %+v no longer reports it", topic, ack)
		}
	}
	t.Logf("%d of %d Subscribes failed for their cancelled ctx", failed, topics)
	if failed == 0 {
		t.Skip("no Subscribe was cancelled in flight")
	}
}

// subscribeCanceller cancels a pending Subscribe's context once the
// topic's owner recorded the subscriber (its SubscriberAdded): the owner's
// answer is then on its way back, so the Subscribe fails after its request
// left.
type subscribeCanceller struct {
	mu      sync.Mutex
	cancels map[string]context.CancelFunc
}

func cancelOnAdded(t *testing.T, owner *pubsub.Node) *subscribeCanceller {
	c := &subscribeCanceller{cancels: map[string]context.CancelFunc{}}
	stop := owner.Events().Subscribe(func(e pubsub.Event) {
		if a, ok := e.(pubsub.SubscriberAdded); ok {
			c.mu.Lock()
			if cancel := c.cancels[a.Topic]; cancel != nil {
				cancel()
			}
			c.mu.Unlock()
		}
	})
	t.Cleanup(stop)
	return c
}

// arm returns the context for a Subscribe to topic, cancelled once the
// owner records it, and the function that cancels and disarms it.
func (c *subscribeCanceller) arm(topic string) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	c.mu.Lock()
	c.cancels[topic] = cancel
	c.mu.Unlock()
	return ctx, func() {
		cancel()
		c.mu.Lock()
		delete(c.cancels, topic)
		c.mu.Unlock()
	}
}
