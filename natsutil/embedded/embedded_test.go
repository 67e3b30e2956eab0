package embedded_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub/natsutil"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// TestMain fails the package if any goroutine outlives the tests: servers
// must be fully stopped by Shutdown + WaitForShutdown (StartServer callers)
// or Cluster.Shutdown. No goleak options are needed: WaitForShutdown waits
// for every server goroutine, and goleak retries for a while, which covers
// nats.go connection goroutines that exit just after Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const waitTimeout = 10 * time.Second

func startServer(t *testing.T) string {
	t.Helper()
	s, err := embedded.StartServer()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s.ClientURL()
}

func startCluster(t *testing.T, n int) *embedded.Cluster {
	t.Helper()
	c, err := embedded.StartCluster(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Shutdown)
	return c
}

func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.NoCallbacksAfterClientClose())
	if err != nil {
		t.Fatalf("connect to %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func subscribeSync(t *testing.T, nc *nats.Conn, subject string) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync(subject)
	if err != nil {
		t.Fatalf("subscribe %q: %v", subject, err)
	}
	// Flush proves the subscription is registered on its own server.
	if err := nc.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	return sub
}

func expectMsg(t *testing.T, sub *nats.Subscription, want string) {
	t.Helper()
	m, err := sub.NextMsg(waitTimeout)
	if err != nil {
		t.Fatalf("waiting for %q on %q: %v", want, sub.Subject, err)
	}
	if string(m.Data) != want {
		t.Fatalf("got %q on %q, want %q", m.Data, sub.Subject, want)
	}
}

func TestStartServer(t *testing.T) {
	url := startServer(t)
	if !strings.HasPrefix(url, "nats://127.0.0.1:") || strings.HasSuffix(url, ":-1") {
		t.Fatalf("client URL %q, want nats://127.0.0.1:<random port>", url)
	}
	nc := connect(t, url)
	sub := subscribeSync(t, nc, "greet")
	if err := nc.Publish("greet", []byte("hello")); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, sub, "hello")
}

func TestStartServerTwiceUsesDistinctPorts(t *testing.T) {
	if a, b := startServer(t), startServer(t); a == b {
		t.Fatalf("two servers share the client URL %s", a)
	}
}

func TestStartClusterForms(t *testing.T) {
	const n = 3
	c := startCluster(t, n)
	if len(c.Servers) != n {
		t.Fatalf("%d servers, want %d", len(c.Servers), n)
	}
	urls := c.URLs()
	seen := map[string]bool{}
	for i, s := range c.Servers {
		if want := "s" + strconv.Itoa(i); s.Name() != want {
			t.Errorf("server %d is named %q, want %q", i, s.Name(), want)
		}
		if got := s.NumRoutes(); got != n-1 {
			t.Errorf("server %d has %d routes, want %d", i, got, n-1)
		}
		if c.URL(i) != urls[i] || urls[i] != s.ClientURL() {
			t.Errorf("server %d: URL %q, URLs()[%d] %q, ClientURL %q differ", i, c.URL(i), i, urls[i], s.ClientURL())
		}
		if seen[urls[i]] {
			t.Errorf("URL %s used twice", urls[i])
		}
		seen[urls[i]] = true
	}
}

func TestStartClusterOfOne(t *testing.T) {
	c := startCluster(t, 1)
	nc := connect(t, c.URL(0))
	sub := subscribeSync(t, nc, "solo")
	if err := c.WaitForInterest("solo", waitTimeout); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("solo", []byte("x")); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, sub, "x")
}

func TestStartClusterRejectsBadSize(t *testing.T) {
	for _, n := range []int{0, -1} {
		if c, err := embedded.StartCluster(n); err == nil {
			c.Shutdown()
			t.Errorf("StartCluster(%d) succeeded, want an error", n)
		}
	}
}

func TestClusterRoutesMessagesAcrossServers(t *testing.T) {
	c := startCluster(t, 3)
	sub := subscribeSync(t, connect(t, c.URL(2)), "orders.new")
	if err := c.WaitForInterest("orders.new", waitTimeout); err != nil {
		t.Fatal(err)
	}
	pub := connect(t, c.URL(0))
	if err := pub.Publish("orders.new", []byte("o-1")); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, sub, "o-1")
}

func TestWaitForInterestMatchesWildcardSubscriptions(t *testing.T) {
	c := startCluster(t, 2)
	subscribeSync(t, connect(t, c.URL(1)), natsutil.NodeSubjectWildcard(natsutil.DefaultPrefix))
	if err := c.WaitForInterest(natsutil.NodeSubject(natsutil.DefaultPrefix, "n1"), waitTimeout); err != nil {
		t.Fatal(err)
	}
}

func TestWaitForInterestTimesOut(t *testing.T) {
	c := startCluster(t, 2)
	start := time.Now()
	err := c.WaitForInterest("nobody.listens", 50*time.Millisecond)
	if err == nil {
		t.Fatal("WaitForInterest succeeded without any subscriber")
	}
	if !strings.Contains(err.Error(), "s0") || !strings.Contains(err.Error(), "s1") {
		t.Errorf("error %q does not name the servers without interest", err)
	}
	if elapsed := time.Since(start); elapsed > waitTimeout {
		t.Errorf("WaitForInterest took %v for a 50ms timeout", elapsed)
	}
}

func TestWaitForInterestSkipsShutdownServers(t *testing.T) {
	c := startCluster(t, 3)
	c.Servers[1].Shutdown()
	c.Servers[1].WaitForShutdown()
	subscribeSync(t, connect(t, c.URL(2)), "after.loss")
	if err := c.WaitForInterest("after.loss", waitTimeout); err != nil {
		t.Fatal(err)
	}
}

func TestShutdownIsIdempotent(t *testing.T) {
	c, err := embedded.StartCluster(3)
	if err != nil {
		t.Fatal(err)
	}
	c.Servers[0].Shutdown() // a single failed server first, as tests do
	c.Shutdown()
	c.Shutdown()
	for i, s := range c.Servers {
		if s.Running() {
			t.Errorf("server %d still running after Shutdown", i)
		}
	}
	// The goroutine check itself is done by goleak in TestMain.
}

// TestNoRespondersStatusFromRealServer checks natsutil's no-responders
// helpers against what a real server sends. nats.go surfaces the status in
// three ways: Request and a synchronous subscription's NextMsg turn it into
// nats.ErrNoResponders, while an asynchronous (handler or channel)
// subscription on a hand-made reply subject receives the status message
// itself.
func TestNoRespondersStatusFromRealServer(t *testing.T) {
	nc := connect(t, startServer(t))

	_, err := nc.Request("nobody.home", []byte("ping"), waitTimeout)
	if !natsutil.IsNoResponders(err) {
		t.Fatalf("Request to a subject without subscribers: err %v, want no responders", err)
	}

	syncInbox := nats.NewInbox()
	syncReplies := subscribeSync(t, nc, syncInbox)
	if err := nc.PublishRequest("nobody.home", syncInbox, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := syncReplies.NextMsg(waitTimeout); !natsutil.IsNoResponders(err) {
		t.Fatalf("NextMsg after a request without responders: err %v, want no responders", err)
	}

	inbox := nats.NewInbox()
	replies := make(chan *nats.Msg, 2)
	if _, err := nc.ChanSubscribe(inbox, replies); err != nil {
		t.Fatal(err)
	}
	next := func() *nats.Msg {
		t.Helper()
		select {
		case m := <-replies:
			return m
		case <-time.After(waitTimeout):
			t.Fatalf("no reply on %s after %v", inbox, waitTimeout)
			return nil
		}
	}
	if err := nc.PublishRequest("nobody.home", inbox, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	if m := next(); !natsutil.IsNoRespondersMsg(m) {
		t.Fatalf("status reply %+v (header %v) not recognised as no responders", m, m.Header)
	}

	// A genuine empty reply from a responder is not mistaken for the status.
	if _, err := nc.Subscribe("echo", func(m *nats.Msg) { _ = m.Respond(nil) }); err != nil {
		t.Fatal(err)
	}
	if err := nc.PublishRequest("echo", inbox, nil); err != nil {
		t.Fatal(err)
	}
	if m := next(); natsutil.IsNoRespondersMsg(m) {
		t.Fatalf("empty reply %+v taken for a no-responders status", m)
	}
}
