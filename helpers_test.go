package pubsub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// fast keeps membership changes quick in tests.
var fast = []pubsub.Option{
	pubsub.WithHeartbeatInterval(50 * time.Millisecond),
	// 40 heartbeats: a loaded 2-core machine running several -race test
	// binaries at once must not make a live member look dead.
	pubsub.WithMemberTimeout(2 * time.Second),
	pubsub.WithRequestTimeout(3 * time.Second),
	pubsub.WithSubscriberTimeout(2 * time.Second),
}

func newCluster(t *testing.T, servers, nodes int, opts ...pubsub.Option) *testcluster.Cluster {
	t.Helper()
	c := testcluster.New(t, servers, nodes, append(append([]pubsub.Option{}, fast...), opts...)...)
	c.WaitConverged(t, 10*time.Second)
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// recorder collects what each subscription received.
type recorder struct {
	mu  sync.Mutex
	got map[pubsub.SubscriberID][]string
	n   int
}

func newRecorder() *recorder { return &recorder{got: map[pubsub.SubscriberID][]string{}} }

func (r *recorder) handler(ctx context.Context, m *pubsub.Message) error {
	id, ok := pubsub.SubscriberFromContext(ctx)
	if !ok {
		panic("handler context without subscriber")
	}
	r.mu.Lock()
	r.got[id] = append(r.got[id], string(m.Data))
	r.n++
	r.mu.Unlock()
	return nil
}

func (r *recorder) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

func (r *recorder) of(id pubsub.SubscriberID) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got[id]...)
}

func subscribe(t *testing.T, n *pubsub.Node, topic string, h pubsub.Handler) *pubsub.Subscription {
	t.Helper()
	s, err := n.Subscribe(ctxT(t), topic, h)
	if err != nil {
		t.Fatalf("subscribe %s on %s: %v", topic, n.ID(), err)
	}
	return s
}

func mustAccept(t *testing.T, ack pubsub.PublishAck, err error, wantDelivered int) {
	t.Helper()
	if err != nil {
		t.Fatalf("publish: %v (ack %+v)", err, ack)
	}
	if ack.Status != pubsub.Accepted || ack.Delivered != wantDelivered || len(ack.Failures) != 0 {
		shown := ack
		if len(shown.Failures) > 3 {
			shown.Failures = shown.Failures[:3] // the rest are counted below
		}
		t.Fatalf("ack = %+v (%d failures in all), want Accepted with %d delivered and no failures", shown, len(ack.Failures), wantDelivered)
	}
}

func msg(i int) []byte { return []byte(fmt.Sprintf("m%05d", i)) }

// watchJoins reports, on the returned channel, each of the listed nodes that
// emits a MemberJoined for member id, until the test ends.
func watchJoins(t *testing.T, c *testcluster.Cluster, id string, nodes ...int) <-chan string {
	joined := make(chan string, 16)
	for _, i := range nodes {
		cancel := c.Nodes[i].Events().Subscribe(func(e pubsub.Event) {
			if j, ok := e.(pubsub.MemberJoined); ok && j.Member.ID == id {
				select {
				case joined <- j.Node:
				default:
				}
			}
		})
		t.Cleanup(cancel)
	}
	return joined
}

// hasMember reports whether id is in n's current view.
func hasMember(n *pubsub.Node, id string) bool {
	for _, m := range n.Members() {
		if m.ID == id {
			return true
		}
	}
	return false
}
