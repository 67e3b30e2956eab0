package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// testCluster is two NATS servers and two nodes, n0 on server 0 and n1 on
// server 1, with 50 ms heartbeats, under prefix "cli".
type testCluster struct {
	urls  string
	sc    *embedded.Cluster
	nodes []*pubsub.Node
}

func newTestCluster(t *testing.T) *testCluster {
	t.Helper()
	// Registered first, so it runs last: after the nodes and servers stop.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	sc, err := embedded.StartCluster(2)
	require.NoError(t, err)
	t.Cleanup(sc.Shutdown)
	tc := &testCluster{urls: strings.Join(sc.URLs(), ","), sc: sc}
	for i, url := range sc.URLs() {
		nc, err := nats.Connect(url)
		require.NoError(t, err)
		t.Cleanup(nc.Close)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		n, err := pubsub.Join(ctx, nc, pubsub.WithPrefix("cli"), pubsub.WithNodeID("n"+string(rune('0'+i))),
			pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(time.Second))
		cancel()
		require.NoError(t, err)
		t.Cleanup(func() { _ = n.Close(context.Background()) })
		tc.nodes = append(tc.nodes, n)
	}
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		return len(tc.nodes[0].Members()) == 2 && len(tc.nodes[1].Members()) == 2
	}), "the nodes do not see each other")
	return tc
}

// cli runs the tool in this process against the cluster.
func (tc *testCluster) cli(t *testing.T, ctx context.Context, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errs bytes.Buffer
	args = append(args, "--url", tc.urls, "--prefix", "cli", "--timeout", "5s")
	code = run(ctx, args, &out, &errs)
	return code, out.String(), errs.String()
}

func TestClusterCommandsInspectAndPublish(t *testing.T) {
	tc := newTestCluster(t)
	ctx := context.Background()
	var mu sync.Mutex
	var got []string
	record := func(_ context.Context, m *pubsub.Message) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, string(m.Data)+" key="+m.Key+" h="+m.Header.Get("trace"))
		return nil
	}
	_, err := tc.nodes[0].Subscribe(ctx, "orders", record)
	require.NoError(t, err)
	_, err = tc.nodes[1].Subscribe(ctx, "orders", record, pubsub.WithGroup("billing"))
	require.NoError(t, err)

	t.Run("members", func(t *testing.T) {
		code, out, errs := tc.cli(t, ctx, "members")
		require.Equal(t, 0, code, errs)
		assert.Regexp(t, `(?m)^n0\s+owner\s`, out)
		assert.Regexp(t, `(?m)^n1\s+owner\s`, out)
		assert.Regexp(t, `(?m)^pubsub-cli-\w+\s+client \(this tool\)\s`, out)
	})
	// Found in review: --json lacked the start time and the "this tool"
	// mark the table shows.
	t.Run("members --json", func(t *testing.T) {
		code, out, errs := tc.cli(t, ctx, "members", "--json")
		require.Equal(t, 0, code, errs)
		var members []struct {
			ID          string
			Incarnation uint64
			ClientOnly  bool
			Started     time.Time
			ThisTool    bool
		}
		require.NoError(t, json.Unmarshal([]byte(out), &members), out)
		byID := map[string]int{}
		tools := 0
		for i, m := range members {
			byID[m.ID] = i
			assert.Equal(t, int64(m.Incarnation), m.Started.UnixNano(), "%s: Started is the incarnation", m.ID)
			assert.WithinDuration(t, time.Now(), m.Started, time.Minute, m.ID)
			if m.ThisTool {
				tools++
				assert.True(t, m.ClientOnly, m.ID)
				assert.True(t, strings.HasPrefix(m.ID, "pubsub-cli-"), m.ID)
			}
		}
		assert.Equal(t, 1, tools, out)
		for _, n := range tc.nodes {
			require.Contains(t, byID, n.ID(), out)
			view := n.Members()
			self := slices.IndexFunc(view, func(m pubsub.Member) bool { return m.ID == n.ID() })
			require.GreaterOrEqual(t, self, 0)
			assert.Equal(t, view[self].Incarnation, members[byID[n.ID()]].Incarnation, n.ID())
			assert.False(t, members[byID[n.ID()]].ThisTool, n.ID())
		}
	})
	t.Run("topics", func(t *testing.T) {
		owner, err := tc.nodes[0].OwnerOf("orders")
		require.NoError(t, err)
		code, out, errs := tc.cli(t, ctx, "topics")
		require.Equal(t, 0, code, errs)
		assert.Regexp(t, `(?m)^orders\s+`+owner.ID+`\s+2\s+billing=1$`, out)
		code, out, errs = tc.cli(t, ctx, "topics", "--json")
		require.Equal(t, 0, code, errs)
		var infos []pubsub.TopicInfo
		require.NoError(t, json.Unmarshal([]byte(out), &infos))
		assert.Equal(t, []pubsub.TopicInfo{{Topic: "orders", Owner: owner.ID, Subscribers: 2, Groups: map[string]int{"billing": 1}}}, infos)
	})
	t.Run("topic", func(t *testing.T) {
		code, out, errs := tc.cli(t, ctx, "topic", "orders")
		require.Equal(t, 0, code, errs)
		assert.Contains(t, out, "subscribers: 2")
		assert.Contains(t, out, "per node:    n0=1 n1=1")
		assert.Contains(t, out, "groups:      billing=1")
	})
	t.Run("pub", func(t *testing.T) {
		code, out, errs := tc.cli(t, ctx, "pub", "orders", "o-1", "--key", "k1", "--header", "trace: abc", "--count", "2")
		require.Equal(t, 0, code, errs)
		assert.Equal(t, 2, strings.Count(out, "orders: accepted, 2 delivered, 0 failed (ack=delivered)"), out)
		mu.Lock()
		assert.Equal(t, []string{"o-1 key=k1 h=abc", "o-1 key=k1 h=abc", "o-1 key=k1 h=abc", "o-1 key=k1 h=abc"}, got)
		mu.Unlock()
		code, out, errs = tc.cli(t, ctx, "pub", "orders", "o-2", "--ack", "accepted")
		require.Equal(t, 0, code, errs)
		assert.Contains(t, out, "(ack=accepted)")
	})
	// Found in review: pub --json printed the ack's status, reason and
	// level, and each failure's status, as numbers ("Status": 0).
	t.Run("pub --json names", func(t *testing.T) {
		s, err := tc.nodes[1].Subscribe(ctx, "refusals", func(context.Context, *pubsub.Message) error { return fmt.Errorf("no") })
		require.NoError(t, err)
		code, out, errs := tc.cli(t, ctx, "pub", "refusals", "r-1", "--json")
		require.Equal(t, 0, code, errs)
		var ack map[string]any
		require.NoError(t, json.Unmarshal([]byte(out), &ack), out)
		assert.Equal(t, "accepted", ack["Status"], out)
		assert.Equal(t, "none", ack["Reason"], out)
		assert.Equal(t, "delivered", ack["Level"], out)
		assert.Equal(t, []any{map[string]any{"Subscriber": map[string]any{"Node": s.ID().Node, "Local": s.ID().Local},
			"Status": "handler-error", "Group": ""}}, ack["Failures"], out)
		code, out, errs = tc.cli(t, ctx, "pub", "orders", "o-3", "--json", "--ack", "none")
		require.Equal(t, 0, code, errs)
		require.NoError(t, json.Unmarshal([]byte(out), &ack), out)
		assert.Equal(t, "none", ack["Level"], out)
		assert.Equal(t, []any{}, ack["Failures"], out)
	})
}

// sub prints what a node publishes and stops after --count; events prints
// the membership change another node's join makes.
func TestClusterCommandsSubAndEvents(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	type result struct {
		code     int
		out, err string
	}
	subDone := make(chan result, 1)
	go func() {
		code, out, errs := tc.cli(t, ctx, "sub", "news", "--count", "2")
		subDone <- result{code, out, errs}
	}()
	// The tool's subscription is registered with the owner once TopicStats
	// counts it; then every publish reaches it.
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		st, err := tc.nodes[0].TopicStats(ctx, "news")
		return err == nil && st.Total == 1
	}), "the tool never subscribed")
	for _, m := range []string{"first", "second", "third"} {
		_, err := tc.nodes[0].Publish(ctx, "news", []byte(m))
		require.NoError(t, err)
	}
	r := <-subDone
	require.Equal(t, 0, r.code, r.err)
	assert.Contains(t, r.out, "[#1] news from n0: first")
	assert.Contains(t, r.out, "[#2] news from n0: second")
	assert.NotContains(t, r.out, "third", "--count 2 stops after two")

	evDone := make(chan result, 1)
	go func() {
		code, out, errs := tc.cli(t, ctx, "events", "--count", "1")
		evDone <- result{code, out, errs}
	}()
	// The tool listens some time after its Join returns: a node joins and
	// leaves until the tool has printed the change.
	for i := 0; ; i++ {
		select {
		case r = <-evDone:
			require.Equal(t, 0, r.code, r.err)
			assert.Regexp(t, `^\d{4}-\d\d-\d\dT\S+Z Member(Joined|Left) Node=\S+ Member=`, r.out)
			return
		case <-time.After(100 * time.Millisecond): // the churn's pace, not a wait for a condition
		}
		nc, err := nats.Connect(tc.urls)
		require.NoError(t, err)
		n, err := pubsub.Join(ctx, nc, pubsub.WithPrefix("cli"), pubsub.WithNodeID(fmt.Sprintf("churn%d", i)),
			pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(time.Second))
		require.NoError(t, err)
		require.NoError(t, n.Close(ctx))
		nc.Close()
	}
}

func TestClusterCommandsUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"topic"}, "want <topic>, got 0 arguments"},
		{[]string{"members", "extra"}, "want no arguments, got 1"},
		{[]string{"pub", "t", "d", "--ack", "maybe"}, `--ack "maybe"`},
		{[]string{"pub", "t", "d", "--header", "novalue"}, `--header "novalue"`},
		{[]string{"sub", "t", "--count", "-1"}, "--count -1"},
		// Found in review: pub --count 0 published once.
		{[]string{"pub", "t", "d", "--count", "0"}, "--count 0: want at least 1"},
		{[]string{"pub", "t", "d", "--count", "-3"}, "--count -3: want at least 1"},
		{[]string{"members", "--timeout", "0s"}, "--timeout 0s"},
		{[]string{"members", "--url", "nats://127.0.0.1:1", "--timeout", "200ms"}, "connect to nats://127.0.0.1:1"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out, errs bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errs)
			assert.Equal(t, 1, code)
			assert.Contains(t, errs.String(), tc.want)
		})
	}
}

// Every cluster command documents every flag with its default, in its own
// --help and in the tool's.
func TestClusterCommandsHelp(t *testing.T) {
	for _, c := range clusterCommands {
		var out, errs bytes.Buffer
		require.Equal(t, 0, run(context.Background(), []string{c.name, "--help"}, &out, &errs), errs.String())
		var all bytes.Buffer
		require.Equal(t, 0, run(context.Background(), []string{"help"}, &all, &errs))
		var o clusterOpts
		c.flagSet(&o).VisitAll(func(fl *flag.Flag) {
			assert.Contains(t, out.String(), "  --"+fl.Name, "%s --help", c.name)
			assert.Contains(t, all.String(), "pubsub "+c.name+" ", "pubsub help")
		})
		assert.Contains(t, out.String(), "(default", c.name)
	}
}

// Found in review: past --count, sub acknowledged the rest of a batch
// unprinted, so a consumer group lost it. The rest is now reported
// SubscriberGone, which the owner re-routes to another member.
func TestSubCountInAGroupHandsTheRestToAnotherMember(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var mu sync.Mutex
	var other []string
	_, err := tc.nodes[1].Subscribe(ctx, "jobs", func(_ context.Context, m *pubsub.Message) error {
		mu.Lock()
		defer mu.Unlock()
		other = append(other, string(m.Data))
		return nil
	}, pubsub.WithGroup("workers"))
	require.NoError(t, err)
	type result struct {
		code     int
		out, err string
	}
	done := make(chan result, 1)
	go func() {
		code, out, errs := tc.cli(t, ctx, "sub", "jobs", "--group", "workers", "--count", "1")
		done <- result{code, out, errs}
	}()
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		st, err := tc.nodes[0].TopicStats(ctx, "jobs")
		return err == nil && st.Total == 2
	}), "the tool never subscribed")
	batch := make([][]byte, 8)
	for i := range batch {
		batch[i] = []byte(fmt.Sprintf("j%d", i))
	}
	ack, err := tc.nodes[0].PublishBatch(ctx, "jobs", batch)
	require.NoError(t, err)
	assert.Empty(t, ack.Failures, "the tool's unprinted share went to the other member")
	r := <-done
	require.Equal(t, 0, r.code, r.err)
	assert.Equal(t, 1, strings.Count(r.out, "[#"), r.out)
	mu.Lock()
	defer mu.Unlock()
	assert.Len(t, other, len(batch)-1, "every message but the printed one reached the other member")
}

// Found in review: events printed the events that arrived between the
// --count-th and the listener's end.
func TestEventsCountIsExact(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs bytes.Buffer
	out := &slowWriter{}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"events", "--count", "1", "--url", tc.urls, "--prefix", "cli", "--timeout", "5s"}, out, &errs)
	}()
	for i := 0; ; i++ {
		select {
		case code := <-done:
			require.Equal(t, 0, code, errs.String())
			assert.Equal(t, 1, strings.Count(out.String(), "\n"), "--count 1 printed:\n%s", out.String())
			return
		case <-time.After(100 * time.Millisecond): // the churn's pace
		}
		var wg sync.WaitGroup
		for j := range 4 { // several changes at once: more events than the count
			wg.Go(func() {
				nc, err := nats.Connect(tc.urls)
				if err != nil {
					return
				}
				defer nc.Close()
				n, err := pubsub.Join(ctx, nc, pubsub.WithPrefix("cli"), pubsub.WithNodeID(fmt.Sprintf("churn%d-%d", i, j)),
					pubsub.WithHeartbeatInterval(50*time.Millisecond), pubsub.WithMemberTimeout(time.Second), pubsub.WithClientOnly())
				if err == nil {
					_ = n.Close(ctx)
				}
			})
		}
		wg.Wait()
	}
}

// slowWriter is a goroutine-safe buffer whose first Write takes 300 ms,
// so that events queue behind the first one printed.
type slowWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
}

func (w *slowWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.writes++
	first := w.writes == 1
	w.mu.Unlock()
	if first {
		time.Sleep(300 * time.Millisecond) // a slow terminal is the point
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *slowWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// After --, every argument is positional, so data may start with a dash.
func TestPubDataAfterDoubleDash(t *testing.T) {
	var out, errs bytes.Buffer
	code := run(context.Background(), []string{"pub", "--url", "nats://127.0.0.1:1", "--timeout", "200ms", "--", "t", "-5"}, &out, &errs)
	assert.Equal(t, 1, code)
	assert.Contains(t, errs.String(), "connect to", "the arguments parsed; only the connection failed")
}

// Found in review: an interrupt while connecting to a server that accepts
// the connection and never answers was ignored until --timeout, as
// nats.Connect takes no context.
func TestInterruptWhileConnectingReturnsAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c // held open, silent
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errs bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"members", "--url", "nats://" + ln.Addr().String(), "--timeout", "1m"}, &out, &errs)
	}()
	var conn net.Conn
	select {
	case conn = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the tool never connected")
	}
	start := time.Now()
	cancel() // the interrupt
	select {
	case code := <-done:
		assert.Equal(t, 1, code)
		assert.Less(t, time.Since(start), 5*time.Second)
		assert.Contains(t, errs.String(), "interrupted while connecting")
	case <-time.After(20 * time.Second):
		t.Fatal("the interrupt was ignored while connecting")
	}
	// Ends the abandoned handshake, so nothing outlives the test.
	require.NoError(t, conn.Close())
	require.NoError(t, ln.Close())
}

// lockedBuffer is a goroutine-safe buffer.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Found in review: sub said nothing while its NATS server was gone (for
// the 2 minutes nats.go tries to reconnect by default), nor when it was
// back. It now tells both on stderr, as the nats CLI does.
func TestSubTellsConnectionLossAndRecovery(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errs lockedBuffer
	done := make(chan int, 1)
	go func() {
		// Server 1 only: the tool learns server 0 from it, and moves there.
		done <- run(ctx, []string{"sub", "alerts", "--url", tc.sc.URL(1), "--prefix", "cli", "--timeout", "5s"}, &out, &errs)
	}()
	require.True(t, embedded.Poll(10*time.Second, func() bool {
		st, err := tc.nodes[0].TopicStats(ctx, "alerts")
		return err == nil && st.Total == 1
	}), "the tool never subscribed")
	// A message printed: the tool's Subscribe has long returned.
	_, err := tc.nodes[0].Publish(ctx, "alerts", []byte("before"))
	require.NoError(t, err)
	require.True(t, embedded.Poll(10*time.Second, func() bool { return strings.Contains(out.String(), "before") }), out.String())
	tc.sc.Servers[1].Shutdown()
	require.True(t, embedded.Poll(20*time.Second, func() bool {
		return strings.Contains(errs.String(), "reconnected to "+tc.sc.URL(0))
	}), "stderr: %s", errs.String())
	assert.Contains(t, errs.String(), "pubsub sub: disconnected from NATS")
	cancel() // the interrupt
	select {
	case code := <-done:
		assert.Equal(t, 0, code, errs.String())
	case <-time.After(20 * time.Second):
		t.Fatal("sub did not end on the interrupt")
	}
}

// Found in review: a wrong --prefix joined an empty cluster quietly, and
// the commands printed empty tables.
func TestWrongPrefixIsNamed(t *testing.T) {
	tc := newTestCluster(t)
	ctx := context.Background()
	code, _, errs := tc.cli(t, ctx, "members")
	require.Equal(t, 0, code, errs)
	assert.NotContains(t, errs, "no pubsub node answered", "the right prefix")

	var wout, werrs bytes.Buffer
	code = run(ctx, []string{"members", "--url", tc.urls, "--prefix", "elsewhere", "--timeout", "5s"}, &wout, &werrs)
	require.Equal(t, 0, code, werrs.String())
	assert.Contains(t, werrs.String(), `no pubsub node answered under prefix "elsewhere"`)
	assert.Contains(t, werrs.String(), "check --prefix")
	assert.Regexp(t, `(?m)^pubsub-cli-\w+\s+client \(this tool\)\s`, wout.String(), "the tool itself is still listed")
	assert.NotContains(t, wout.String(), "owner")
}

// Found in review: sub interrupted while its Subscribe was still waiting
// exited 1 with "context canceled"; an interrupt is sub's normal end.
func TestSubInterruptedWhileSubscribingExitsZero(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errs := &lockedBuffer{}
	done := make(chan int, 1)
	go func() {
		// No node serves prefix "empty": Subscribe waits for an owner
		// until --timeout.
		done <- run(ctx, []string{"sub", "t", "--url", tc.urls, "--prefix", "empty", "--timeout", "1m"}, io.Discard, errs)
	}()
	require.True(t, embedded.Poll(20*time.Second, func() bool { return strings.Contains(errs.String(), "no pubsub node answered") }),
		"the tool never joined: %s", errs.String())
	select {
	case code := <-done:
		t.Fatalf("sub ended (exit %d) before the interrupt: %s", code, errs.String())
	default:
	}
	cancel() // the interrupt
	select {
	case code := <-done:
		assert.Equal(t, 0, code, errs.String())
	case <-time.After(20 * time.Second):
		t.Fatal("the interrupt was ignored while subscribing")
	}
}

// Found probing the tool: events waited only for an interrupt or --count,
// so once its NATS connection closed for good (nats.go out of reconnect
// attempts, after about 2 minutes with a server gone) it printed the
// node's NodeStopped and then hung forever, where sub ends with the error.
func TestEventsEndsWhenItsNodeStops(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	s, err := embedded.StartServer()
	require.NoError(t, err)
	defer func() {
		s.Shutdown()
		s.WaitForShutdown()
		goleak.VerifyNone(t, ignore)
	}()
	nc, err := nats.Connect(s.ClientURL())
	require.NoError(t, err)
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	node, err := pubsub.Join(ctx, nc, pubsub.WithClientOnly(), pubsub.WithNodeID("tool"))
	require.NoError(t, err)
	defer func() { _ = node.Close(context.Background()) }()
	var out lockedBuffer
	done := make(chan error, 1)
	go func() { done <- runEvents(ctx, node, &clusterOpts{timeout: time.Second}, nil, &out) }()
	nc.Close() // what nats.go does when it gives up reconnecting
	select {
	case err := <-done:
		require.ErrorIs(t, err, pubsub.ErrClosed)
		assert.Contains(t, out.String(), "NodeStopped")
	case <-time.After(5 * time.Second):
		t.Fatalf("events did not end when its node stopped; printed:\n%s", out.String())
	}
}

// Found probing the tool: credentials given in --url (the only way to
// give them) were printed back in full on stderr by every message that
// names the URL: a failed connect, a failed join, a wrong prefix, and
// bench's connect and disconnect errors. They are redacted now, as
// nats.go redacts the URLs it reports.
func TestURLCredentialsAreNotPrinted(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	s, err := embedded.StartServerWith(func(o *server.Options) { o.Username, o.Password = "u", "s3cret" })
	require.NoError(t, err)
	defer func() {
		s.Shutdown()
		s.WaitForShutdown()
		goleak.VerifyNone(t, ignore)
	}()
	host := strings.TrimPrefix(s.ClientURL(), "nats://")
	for _, tc := range []struct {
		name     string
		args     []string
		code     int
		want     string
		password string
	}{
		{"wrong prefix", []string{"members", "--prefix", "elsewhere", "--url", "nats://u:s3cret@" + host}, 0, "at nats://u:xxxxx@" + host, "s3cret"},
		{"wrong password", []string{"members", "--url", "nats://u:wr0ng@" + host}, 1, "connect to nats://u:xxxxx@" + host, "wr0ng"},
		{"token in a list", []string{"members", "--url", "nats://127.0.0.1:1,nats://t0ken@" + host}, 1, "nats://xxxxx@" + host, "t0ken"},
		{"bench", []string{"bench", "fanout", "--count", "10", "--url", "nats://u:wr0ng@" + host}, 1, "to nats://u:xxxxx@" + host, "wr0ng"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errs bytes.Buffer
			code := run(context.Background(), append(tc.args, "--timeout", "5s"), &out, &errs)
			assert.Equal(t, tc.code, code, errs.String())
			assert.NotContains(t, errs.String(), tc.password)
			assert.Contains(t, errs.String(), tc.want)
		})
	}
}

// Found probing the tool: a flag whose default is empty (pub's --key and
// --header, sub's --group) was documented as "(default )".
func TestHelpNamesEmptyDefaults(t *testing.T) {
	var out, errs bytes.Buffer
	require.Equal(t, 0, run(context.Background(), []string{"help"}, &out, &errs), errs.String())
	help := strings.Join(strings.Fields(out.String()), " ") // unwrapped
	assert.NotContains(t, help, "(default )")
	assert.Contains(t, help, "the message's routing key (consumer groups route by it) (default: none)")
}
