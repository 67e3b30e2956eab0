// Command observe prints a cluster's event stream while it works: publishes,
// a failing subscriber that gets evicted, and a node that crashes.
//
//	go run ./examples/observe
//
// It starts a 3-server embedded NATS cluster and 3 nodes in this process and
// exits 0 once it has seen the eviction and the node loss.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "observe:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	servers, err := embedded.StartCluster(3)
	if err != nil {
		return err
	}
	defer servers.Shutdown()

	opts := []pubsub.Option{
		pubsub.WithHeartbeatInterval(100 * time.Millisecond),
		pubsub.WithMemberTimeout(time.Second),
		pubsub.WithEvictAfter(2),
		pubsub.WithMetricsInterval(time.Second),
	}
	var nodes []*pubsub.Node
	var conns []*nats.Conn
	defer func() {
		for _, n := range nodes {
			_ = n.Close(context.Background())
		}
		for _, nc := range conns {
			nc.Close()
		}
	}()
	printer := newPrinter()
	for i, name := range []string{"alpha", "beta", "gamma"} {
		urls := append([]string{servers.URL(i)}, servers.URLs()...)
		nc, err := nats.Connect(strings.Join(urls, ","), nats.DontRandomize())
		if err != nil {
			return err
		}
		conns = append(conns, nc)
		n, err := pubsub.Join(ctx, nc, append(opts, pubsub.WithNodeID(name))...)
		if err != nil {
			return err
		}
		nodes = append(nodes, n)
		stop := n.Events().Subscribe(printer.print)
		defer stop()
	}
	for _, n := range nodes {
		if err := n.WaitMembers(ctx, 3); err != nil {
			return fmt.Errorf("views did not converge: %w", err)
		}
	}

	fmt.Println("--- subscribing: one healthy subscriber per node, one failing on gamma")
	for _, n := range nodes {
		if _, err := n.Subscribe(ctx, "prices", func(context.Context, *pubsub.Message) error { return nil }); err != nil {
			return err
		}
	}
	failing, err := nodes[2].Subscribe(ctx, "prices", func(context.Context, *pubsub.Message) error {
		return errors.New("database unavailable")
	})
	if err != nil {
		return err
	}

	fmt.Println("--- publishing until the failing subscriber is evicted")
	for i := 0; i < 3; i++ {
		if _, err := nodes[0].Publish(ctx, "prices", []byte(fmt.Sprintf("tick %d", i))); err != nil {
			return err
		}
	}
	select {
	case <-failing.Done():
	case <-ctx.Done():
		return errors.New("the failing subscriber was not evicted")
	}

	fmt.Println("--- crashing beta (its connection closes, no goodbye)")
	conns[1].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ack, err := nodes[0].Publish(ctx, "prices", []byte("after crash"))
		if err == nil && ack.Delivered == 2 && len(ack.Failures) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("publishes not served after the crash: %+v %v", ack, err)
		}
	}
	// Listeners run on their own goroutines: wait until both survivors have
	// printed beta's departure before stopping them.
	for !printer.sawLeave("alpha", "beta") || !printer.sawLeave("gamma", "beta") {
		if ctx.Err() != nil {
			return errors.New("the survivors did not report beta leaving")
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with ctx as deadline
	}
	fmt.Println("--- done: survivors serve the topic again")
	return nil
}

// printer writes events as aligned columns; listeners run on their own
// goroutines, so it serialises them.
type printer struct {
	mu    sync.Mutex
	start time.Time
	left  map[string]bool // "node/member" for each MemberLeft printed
}

func newPrinter() *printer { return &printer{start: time.Now(), left: map[string]bool{}} }

// sawLeave reports whether node's listener printed member leaving.
func (p *printer) sawLeave(node, member string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.left[node+"/"+member]
}

func (p *printer) print(e pubsub.Event) {
	var node, kind, detail string
	switch e := e.(type) {
	case pubsub.MemberJoined:
		node, kind, detail = e.Node, "member-joined", fmt.Sprintf("member=%s members=%d", e.Member.ID, e.Members)
	case pubsub.MemberLeft:
		node, kind, detail = e.Node, "member-left", fmt.Sprintf("member=%s members=%d", e.Member.ID, e.Members)
	case pubsub.TopicOwnerChanged:
		node, kind, detail = e.Node, "owner-changed", fmt.Sprintf("topic=%s %s -> %s", e.Topic, e.OldOwner, e.NewOwner)
	case pubsub.SubscriberAdded:
		node, kind, detail = e.Node, "subscriber-added", fmt.Sprintf("topic=%s sub=%s", e.Topic, e.Subscriber)
	case pubsub.SubscriberRemoved:
		node, kind, detail = e.Node, "subscriber-removed", fmt.Sprintf("topic=%s sub=%s", e.Topic, e.Subscriber)
	case pubsub.SubscriberEvicted:
		node, kind, detail = e.Node, "subscriber-evicted", fmt.Sprintf("topic=%s sub=%s status=%s", e.Topic, e.Subscriber, e.Status)
	case pubsub.PublishAccepted:
		node, kind, detail = e.Node, "publish-accepted", fmt.Sprintf("topic=%s msgs=%d delivered=%d failed=%d", e.Topic, e.Messages, e.Delivered, e.Failed)
	case pubsub.PublishRejected:
		node, kind, detail = e.Node, "publish-rejected", fmt.Sprintf("topic=%s msgs=%d reason=%s", e.Topic, e.Messages, e.Reason)
	case pubsub.DeliverySucceeded:
		node, kind, detail = e.Node, "delivery-ok", fmt.Sprintf("topic=%s subscribers=%d msgs=%d", e.Topic, e.Subscribers, e.Messages)
	case pubsub.DeliveryFailed:
		node, kind, detail = e.Node, "delivery-failed", fmt.Sprintf("topic=%s sub=%s status=%s", e.Topic, e.Subscriber, e.Status)
	case pubsub.MetricsSnapshot:
		s := e.Stats
		node, kind, detail = e.Node, "metrics", fmt.Sprintf("members=%d owned=%d subs=%d published=%d delivered=%d failed=%d",
			s.Members, s.TopicsOwned, s.Subscriptions, s.MessagesPublished, s.Deliveries, s.DeliveryFailures)
	case pubsub.EventsDropped:
		node, kind, detail = e.Node, "events-dropped", fmt.Sprintf("count=%d", e.Dropped)
	case pubsub.NodeStopped:
		node, kind, detail = e.Node, "node-stopped", fmt.Sprintf("err=%v", e.Err)
	case pubsub.QuorumChanged:
		node, kind, detail = e.Node, "quorum-changed", fmt.Sprintf("quorum=%t members=%d stable=%d", e.HasQuorum, e.Members, e.Stable)
	case pubsub.MemberRejected:
		node, kind, detail = e.Node, "member-rejected", fmt.Sprintf("member=%s members=%d limit=%d rejected=%d", e.Member, e.Members, e.Limit, e.Rejected)
	default:
		kind = fmt.Sprintf("%T", e)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if l, ok := e.(pubsub.MemberLeft); ok {
		p.left[l.Node+"/"+l.Member.ID] = true
	}
	fmt.Printf("%8.3fs  %-6s  %-19s %s\n", time.Since(p.start).Seconds(), node, kind, detail)
}
