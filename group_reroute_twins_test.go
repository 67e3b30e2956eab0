package pubsub_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// Two members' shares of one batch, both failed with MailboxFull, are
// re-routed to the same third member; the messages are distinct but equal
// (same data, no key). Each share must run there: the second is not a copy
// of the first, though it has the same producer number and fingerprint.
// Before the re-routed share's positions were kept beside its fingerprint,
// the second was answered Delivered without running (x ran twice of 3).
func TestGroupTwoReroutedSharesOfEqualMessagesBothRun(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "reroute-twins")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	var mu sync.Mutex
	ran := map[string][]string{}
	record := func(id string, m *pubsub.Message) {
		mu.Lock()
		ran[string(m.Data)] = append(ran[string(m.Data)], id)
		mu.Unlock()
	}
	for _, x := range []struct {
		id   string
		node int
	}{{"X1", 2}, {"X2", 2}} {
		_, err := c.Nodes[x.node].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
			record(x.id, m)
			<-release
			return nil
		}, pubsub.WithGroup("g"), pubsub.WithSubscriptionMailbox(1))
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(ctx context.Context, m *pubsub.Message) error {
		record("Y", m)
		return nil
	}, pubsub.WithGroup("g"))
	if err != nil {
		t.Fatal(err)
	}
	const fills = 16
	for i := range fills {
		if _, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("fill")}}, pubsub.WithAck(pubsub.AckAccepted)); err != nil {
			t.Fatal(i, err)
		}
	}
	// Both X mailboxes full: each runs one fill and holds one, Y ran the
	// rest, so every fill is placed.
	testcluster.WaitFor(t, 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(ran["fill"]) >= fills-2
	}, "fills not all handled")
	mu.Lock()
	t.Logf("fills %v", ran["fill"])
	mu.Unlock()
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}, {Data: []byte("x")}, {Data: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ack %+v", ack)
	// Delivered: Y reported after its handler ran each share.
	mu.Lock()
	defer mu.Unlock()
	t.Logf("ran x %v", ran["x"])
	if ack.Delivered != 1 || len(ack.Failures) != 0 {
		t.Fatalf("the group's shares were not all re-routed and delivered: ack %+v", ack)
	}
	if len(ran["x"]) != 3 {
		t.Errorf("group ran x %d times %v; the batch had 3 (ack %+v)", len(ran["x"]), ran["x"], ack)
	}
}
