package testcluster_test

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
	"github.com/clusterpubsub/pubsub/internal/wire"
)

const (
	// waitTimeout bounds waits for things that must happen.
	waitTimeout = 10 * time.Second
	// quiet is how long a negative check watches for a message that must
	// not arrive.
	quiet = 300 * time.Millisecond
)

// fastOpts make membership react within seconds: a 2 s member timeout is
// still 20 heartbeats, so a loaded machine does not fake a failure.
func fastOpts() []pubsub.Option {
	return []pubsub.Option{
		pubsub.WithMemberTimeout(2 * time.Second),
		pubsub.WithHeartbeatInterval(100 * time.Millisecond),
	}
}

// TestFaultyRoutesGoThroughLinks checks the topology: one route per server
// pair, each carried by its link, and none bypassing them (cutting every
// link leaves no route at all).
func TestFaultyRoutesGoThroughLinks(t *testing.T) {
	const n = 4
	c := testcluster.NewFaulty(t, n, 0)
	for i := range n {
		for j := i + 1; j < n; j++ {
			if got := c.Route(i, j).NumConns(); got != 1 {
				t.Errorf("route link %d-%d carries %d connections, want 1", i, j, got)
			}
			if c.Route(j, i) != c.Route(i, j) {
				t.Errorf("Route(%d, %d) != Route(%d, %d)", j, i, i, j)
			}
		}
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			c.Route(i, j).Cut()
		}
	}
	testcluster.WaitFor(t, waitTimeout, func() bool {
		for _, s := range c.Servers.Servers {
			if s.NumRoutes() != 0 {
				return false
			}
		}
		return true
	}, "routes survive cutting every link: some route bypasses the proxies")
	c.HealAll()
	c.WaitMeshed(t, waitTimeout)
}

// subscribe subscribes synchronously on nc and flushes, so the
// subscription is registered on nc's server.
func subscribe(t *testing.T, nc *nats.Conn, subject string) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sub
}

func publish(t *testing.T, nc *nats.Conn, subject, data string) {
	t.Helper()
	if err := nc.Publish(subject, []byte(data)); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func next(t *testing.T, sub *nats.Subscription, timeout time.Duration) (string, bool) {
	t.Helper()
	m, err := sub.NextMsg(timeout)
	if errors.Is(err, nats.ErrTimeout) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(m.Data), true
}

// TestStallRouteOneWay stalls the route from server 1 to server 0 only:
// server 0 stops hearing server 1 while server 1 still hears server 0.
// After Heal, traffic flows again.
func TestStallRouteOneWay(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 3, fastOpts()...)
	c.WaitConverged(t, waitTimeout)

	at0, at1 := c.Connect(t, 0), c.Connect(t, 1)
	sub0 := subscribe(t, at0, "probe.to0")
	sub1 := subscribe(t, at1, "probe.to1")
	c.WaitForInterest(t, "probe.to0", waitTimeout)
	c.WaitForInterest(t, "probe.to1", waitTimeout)

	c.StallRoute(1, 0)
	if got := c.Route(0, 1).Stalled(); got != faultnet.Forward {
		t.Fatalf("StallRoute(1, 0) stalled %v on the link dialed by server 1, want forward", got)
	}
	publish(t, at1, "probe.to0", "held")
	publish(t, at0, "probe.to1", "flows")
	if got, ok := next(t, sub1, waitTimeout); !ok || got != "flows" {
		t.Fatalf("0→1 during the stall: got %q (received %v), want \"flows\"", got, ok)
	}
	if got, ok := next(t, sub0, quiet); ok {
		t.Fatalf("1→0 during the stall: received %q", got)
	}

	healed := time.Now()
	c.Route(0, 1).Heal()
	// The held message arrives at heal if the route connection survived the
	// stall; if a server closed it meanwhile, it was lost with it.
	if got, ok := next(t, sub0, 2*time.Second); ok {
		t.Logf("held message %q delivered %v after heal", got, time.Since(healed))
		if got != "held" {
			t.Fatalf("first message after heal: %q, want \"held\"", got)
		}
	} else {
		t.Logf("held message lost: the route was closed during the stall")
	}
	c.WaitMeshed(t, waitTimeout)
	c.WaitForInterest(t, "probe.to0", waitTimeout)
	publish(t, at1, "probe.to0", "after")
	if got, ok := next(t, sub0, waitTimeout); !ok || got != "after" {
		t.Fatalf("1→0 after heal: got %q (received %v), want \"after\"", got, ok)
	}
	c.WaitConverged(t, waitTimeout)
}

// TestCutClient cuts node 0's connection: the other nodes drop it from
// their views after the member timeout, and after Heal it reconnects
// through the proxy and all three converge again.
func TestCutClient(t *testing.T) {
	c := testcluster.NewFaulty(t, 3, 3, fastOpts()...)
	c.WaitConverged(t, waitTimeout)

	c.Client(0).Cut()
	testcluster.WaitFor(t, waitTimeout, func() bool { return !c.Conns[0].IsConnected() },
		"node 0's connection still connected after its link was cut")
	start := time.Now()
	c.WaitConverged(t, waitTimeout, 1, 2)
	t.Logf("n1 and n2 dropped n0 %v after the cut", time.Since(start))
	if !c.Conns[0].IsReconnecting() {
		t.Errorf("node 0's connection status %v, want reconnecting while cut", c.Conns[0].Status())
	}

	c.HealAll()
	start = time.Now()
	c.WaitConverged(t, waitTimeout)
	t.Logf("all three converged %v after heal", time.Since(start))
	if got := c.Client(0).NumConns(); got != 1 {
		t.Errorf("node 0's link carries %d connections after reconnect, want 1", got)
	}
}

// TestForgeHeartbeat checks the forging helpers: a forged heartbeat reaches
// a subscriber on <prefix>.members intact, and decodes as built.
func TestForgeHeartbeat(t *testing.T) {
	c := testcluster.NewFaulty(t, 2, 0, pubsub.WithPrefix("forge"))
	if got := c.Prefix(); got != "forge" {
		t.Fatalf("Prefix = %q, want \"forge\"", got)
	}
	members := subscribe(t, c.Connect(t, 1), "forge.members")
	inbox := subscribe(t, c.Connect(t, 1), "forge.node.n7")
	c.WaitForInterest(t, "forge.members", waitTimeout)
	c.WaitForInterest(t, "forge.node.n7", waitTimeout)

	for _, kind := range []string{testcluster.KindHeartbeat, testcluster.KindJoin, testcluster.KindLeave} {
		b := testcluster.HeartbeatBytes(kind, "ghost", 7, 42)
		c.ForgeMembers(t, 0, b)
		m, err := members.NextMsg(waitTimeout)
		if err != nil {
			t.Fatal(err)
		}
		var env wire.Envelope
		if err := proto.Unmarshal(m.Data, &env); err != nil {
			t.Fatal(err)
		}
		hb := env.GetHeartbeat()
		if hb.GetKind().String() != kind || hb.GetFrom().GetNodeId() != "ghost" ||
			hb.GetFrom().GetIncarnation() != 7 || hb.GetViewId() != 42 {
			t.Errorf("forged %s decodes as %v", kind, hb)
		}
	}

	c.ForgeToNode(t, 0, "n7", []byte("garbage"))
	if m, err := inbox.NextMsg(waitTimeout); err != nil || string(m.Data) != "garbage" {
		t.Fatalf("ForgeToNode: %v, %v", m, err)
	}
}

func TestBitFlip(t *testing.T) {
	data := testcluster.HeartbeatBytes(testcluster.KindHeartbeat, "n1", 1, 1)
	orig := bytes.Clone(data)
	a := testcluster.BitFlip(data, rand.New(rand.NewPCG(1, 2)))
	b := testcluster.BitFlip(data, rand.New(rand.NewPCG(1, 2)))
	if !bytes.Equal(data, orig) {
		t.Error("BitFlip modified its input")
	}
	if !bytes.Equal(a, b) {
		t.Error("BitFlip not reproducible from the same seed")
	}
	if bytes.Equal(a, data) {
		t.Error("BitFlip returned its input unchanged")
	}
	if len(a) != len(data) {
		t.Errorf("BitFlip changed the length: %d, want %d", len(a), len(data))
	}
	if got := testcluster.BitFlip(nil, rand.New(rand.NewPCG(1, 2))); len(got) != 1 {
		t.Errorf("BitFlip(nil) = %v, want one byte", got)
	}
}
