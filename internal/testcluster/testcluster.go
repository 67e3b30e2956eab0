// Package testcluster runs a pubsub cluster inside one test process: several
// embedded NATS servers joined by routes, and pubsub nodes spread over them,
// with helpers to inject faults (crashed nodes, lost servers) and to wait for
// the cluster to settle. NewFaulty builds the same cluster with a
// fault-injecting proxy (internal/faultnet) on every route and every node
// connection, for cut and one-way stalled links, and the Forge helpers
// inject hand-made messages.
//
// Everything started here is torn down by t.Cleanup, in dependency order:
// nodes first (so their leave announcements can still go out), then NATS
// connections, then servers. After the teardown the same cleanup checks,
// with goleak, that no goroutine started since the cluster was created
// outlives it, so a leak fails the test that caused it, not only the test
// binary.
//
// Functions taking a testing.TB may call t.Fatalf, so they must be called
// from the test's own goroutine.
package testcluster

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/leakcheck"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

const (
	// opTimeout bounds each Join and each Close made by the harness: far
	// above what a healthy cluster needs, so that only a real hang fails.
	opTimeout = 10 * time.Second

	// reconnectWait is the pause between reconnect attempts of the nodes'
	// connections: short, so that failover after ShutdownServer takes
	// milliseconds rather than the client's default 2 s.
	reconnectWait = 50 * time.Millisecond
)

// Cluster is a running test cluster. Nodes and Conns are indexed alike:
// Conns[i] is the connection Nodes[i] joined over. Indexes never change;
// crashed and closed nodes keep their slot.
type Cluster struct {
	// Servers is the routed NATS cluster the nodes connect to.
	Servers *embedded.Cluster
	// Nodes holds every node started by New and AddNode, in start order;
	// Nodes[i] is first connected to server i % len(servers) unless it was
	// added with AddNode, which names its server.
	Nodes []*pubsub.Node
	// Conns[i] is the NATS connection of Nodes[i].
	Conns []*nats.Conn

	// faults is set by NewFaulty: the proxies every route and every node
	// connection go through. Nil for clusters made by New.
	faults *faults

	mu          sync.Mutex
	live        []bool             // live[i]: Nodes[i] is neither crashed nor closed
	raw         []*nats.Conn       // connections made by Connect
	clientLinks []*faultnet.Link   // clientLinks[i] carries Conns[i]; all nil unless faulty
	forgers     map[int]*nats.Conn // raw connections used by the Forge helpers, by server
}

// New starts servers embedded NATS servers as a routed cluster and then, one
// after the other, nodes pubsub nodes: node i has ID "n<i>" and connects
// first to server i % servers. Each node's connection lists every server,
// its own first and in a fixed order (nats.DontRandomize), and retries
// forever, so the node fails over when its server is shut down. Every node
// joins with opts followed by WithNodeID, so the harness's IDs always win.
//
// New does not wait for the nodes' views to converge; call WaitConverged.
// The cluster is torn down by t.Cleanup, which then fails t if a goroutine
// started after New was called is still running (see verifyNoLeaks).
func New(t testing.TB, servers, nodes int, opts ...pubsub.Option) *Cluster {
	t.Helper()
	verifyNoLeaks(t)
	sc, err := embedded.StartCluster(servers)
	if err != nil {
		t.Fatalf("testcluster: start %d NATS servers: %v", servers, err)
	}
	c := &Cluster{Servers: sc}
	// Registered before any node starts, so that a failure half-way through
	// still releases what was started.
	t.Cleanup(func() { c.cleanup(t) })
	for i := range nodes {
		c.AddNode(t, "n"+strconv.Itoa(i), i%servers, opts...)
	}
	return c
}

// AddNode starts one more node with ID id (or the default random ID when id
// is empty), connected first to server server, and appends it to Nodes and
// Conns. It returns once Join has returned; the node is live and torn down
// by the cleanup registered by New.
func (c *Cluster) AddNode(t testing.TB, id string, server int, opts ...pubsub.Option) *pubsub.Node {
	t.Helper()
	c.checkServer(t, server)
	name := id
	if name == "" {
		c.mu.Lock()
		name = "node-" + strconv.Itoa(len(c.Nodes))
		c.mu.Unlock()
	}
	nc, link, err := c.connectNode(name, server)
	if err != nil {
		t.Fatalf("testcluster: connect node %s to server %d: %v", name, server, err)
	}
	if id != "" {
		opts = append(slices.Clip(opts), pubsub.WithNodeID(id))
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	node, err := pubsub.Join(ctx, nc, opts...)
	if err != nil {
		// Not appended: Nodes and Conns must stay index-aligned.
		nc.Close()
		if link != nil {
			link.Close()
		}
		t.Fatalf("testcluster: join node %s on server %d: %v", name, server, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.Nodes = append(c.Nodes, node)
	c.Conns = append(c.Conns, nc)
	c.live = append(c.live, true)
	c.clientLinks = append(c.clientLinks, link)
	return node
}

// Connect returns a plain NATS connection to server server only, closed by
// the cluster's cleanup. Tests use it to play a misbehaving peer, such as
// one publishing garbage on node inboxes.
func (c *Cluster) Connect(t testing.TB, server int) *nats.Conn {
	t.Helper()
	c.checkServer(t, server)
	nc, err := nats.Connect(c.Servers.URL(server),
		nats.Name("testcluster-raw-"+strconv.Itoa(server)),
		nats.NoCallbacksAfterClientClose(),
	)
	if err != nil {
		t.Fatalf("testcluster: connect to server %d: %v", server, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.raw = append(c.raw, nc)
	return nc
}

// Crash stops node i abruptly, as if its process died: its NATS connection
// is closed without Nodes[i].Close being called, so no leave is announced
// and peers only notice through the member timeout. The node is no longer
// live. Its object is still Closed by the cleanup, only to stop its
// goroutines.
func (c *Cluster) Crash(i int) {
	c.mu.Lock()
	c.live[i] = false
	nc := c.Conns[i]
	c.mu.Unlock()
	nc.Close()
}

// ShutdownServer shuts NATS server i down and waits until it has stopped.
// Nodes connected to it reconnect to another server.
func (c *Cluster) ShutdownServer(i int) {
	s := c.Servers.Servers[i]
	s.Shutdown()
	s.WaitForShutdown()
}

// RestartServer replaces NATS server i by a new server process, as one
// step of an operator's rolling upgrade: stop ends the old server (nil:
// ShutdownServer; a test may pass (*server.Server).LameDuckShutdown, which
// needs a short LameDuckDuration), then a server with the same name,
// client port and route port starts, with explicit routes to every other
// running server, and configure (if not nil) adjusts its options first.
// Nodes' connections still list the old URL, so they may reconnect to it.
// It returns once the new server is routed to every running server.
// Clusters made by NewFaulty are not supported: their routes go through
// proxies bound to the old server.
func (c *Cluster) RestartServer(t testing.TB, i int, stop func(*server.Server), configure func(*server.Options)) {
	t.Helper()
	c.checkServer(t, i)
	if c.faults != nil {
		t.Fatalf("testcluster: RestartServer on a cluster made by NewFaulty")
	}
	old := c.Servers.Servers[i]
	u, err := url.Parse(old.ClientURL())
	addr := old.ClusterAddr()
	if err != nil || addr == nil {
		t.Fatalf("testcluster: server %d not running (%v)", i, err)
	}
	var routes []*url.URL
	for j, s := range c.Servers.Servers {
		if a := s.ClusterAddr(); j != i && a != nil {
			routes = append(routes, &url.URL{Scheme: "nats-route", Host: a.String()})
		}
	}
	if stop == nil {
		stop = (*server.Server).Shutdown
	}
	stop(old)
	old.WaitForShutdown()
	port, _ := strconv.Atoi(u.Port())
	s, err := embedded.StartServerWith(func(o *server.Options) {
		o.ServerName = old.Name()
		o.Port = port
		o.Cluster = server.ClusterOpts{Name: old.ClusterName(), Host: addr.IP.String(), Port: addr.Port, PoolSize: -1}
		o.Routes = routes
		if configure != nil {
			configure(o)
		}
	})
	if err != nil {
		t.Fatalf("testcluster: restart server %d: %v", i, err)
	}
	c.Servers.Servers[i] = s
	WaitFor(t, opTimeout, func() bool {
		for _, s := range c.Servers.Servers {
			if s.Running() && s.NumRoutes() != len(routes) {
				return false
			}
		}
		return true
	}, "testcluster: restarted server %d not routed to the %d running servers within %v", i, len(routes), opTimeout)
}

// CloseNode closes node i gracefully (it announces its leave) and marks it
// not live. It fails the test if Close fails or takes longer than 10 s.
func (c *Cluster) CloseNode(t testing.TB, i int) {
	t.Helper()
	c.mu.Lock()
	c.live[i] = false
	node := c.Nodes[i]
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := node.Close(ctx); err != nil {
		t.Fatalf("testcluster: close node %s: %v", node.ID(), err)
	}
}

// Live returns the indexes of the nodes that are neither crashed nor closed,
// in increasing order: the set WaitConverged uses by default.
func (c *Cluster) Live() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var idx []int
	for i, ok := range c.live {
		if ok {
			idx = append(idx, i)
		}
	}
	return idx
}

// WaitConverged waits until each node listed in live (by default every live
// node) reports, through Members, exactly the IDs of the listed nodes. On
// timeout it fails the test with every listed node's view.
func (c *Cluster) WaitConverged(t testing.TB, timeout time.Duration, live ...int) {
	t.Helper()
	if len(live) == 0 {
		live = c.Live()
	}
	c.mu.Lock()
	nodes := make([]*pubsub.Node, len(live))
	for k, i := range live {
		nodes[k] = c.Nodes[i]
	}
	c.mu.Unlock()

	want := make([]string, len(nodes))
	for k, n := range nodes {
		want[k] = n.ID()
	}
	slices.Sort(want)

	converged := func() bool {
		for _, n := range nodes {
			if !slices.Equal(memberIDs(n), want) {
				return false
			}
		}
		return true
	}
	if waitUntil(timeout, converged) {
		return
	}
	var views strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&views, "\n  %s sees %v", n.ID(), memberIDs(n))
	}
	t.Fatalf("testcluster: views of nodes %v did not converge on %v within %v:%s", live, want, timeout, views.String())
}

// WaitFor polls cond every millisecond until it returns true, and fails the test
// with the given message if it still does not after timeout. cond is
// checked once more at the deadline, so a zero timeout is a plain assertion.
func WaitFor(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	if !waitUntil(timeout, cond) {
		t.Fatalf(format, args...)
	}
}

// waitUntil polls cond until it holds or timeout elapses, and reports
// whether it held (embedded.Poll).
func waitUntil(timeout time.Duration, cond func() bool) bool {
	return embedded.Poll(timeout, cond)
}

// memberIDs returns the sorted IDs of n's current member view. It sorts
// although Members promises sorted output, so that a convergence wait does
// not hang on an ordering bug that other tests report more clearly.
func memberIDs(n *pubsub.Node) []string {
	members := n.Members()
	ids := make([]string, len(members))
	for k, m := range members {
		ids[k] = m.ID
	}
	slices.Sort(ids)
	return ids
}

// urlsFrom returns every server's client URL, starting with server first
// and continuing in ring order, so each node has a distinct, deterministic
// failover sequence.
func (c *Cluster) urlsFrom(first int) []string {
	urls := c.Servers.URLs()
	return append(urls[first:], urls[:first]...)
}

// connectNode opens the NATS connection of a new node named name, first
// connected to server. In a cluster made by New it lists every server and
// fails over between them; in one made by NewFaulty it goes through a new
// client link to server only (see NewFaulty), and link is that link.
func (c *Cluster) connectNode(name string, server int) (nc *nats.Conn, link *faultnet.Link, err error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(reconnectWait),
		nats.NoCallbacksAfterClientClose(),
	}
	if c.faults == nil {
		nc, err = nats.Connect(strings.Join(c.urlsFrom(server), ","), append(opts, nats.DontRandomize())...)
		return nc, nil, err
	}
	return c.faults.connectNode(c.Servers.Servers[server], opts)
}

// checkServer fails the test if server is not a valid server index.
func (c *Cluster) checkServer(t testing.TB, server int) {
	t.Helper()
	if n := len(c.Servers.Servers); server < 0 || server >= n {
		t.Fatalf("testcluster: server index %d out of range [0, %d)", server, n)
	}
}

// verifyNoLeaks registers a cleanup that fails t if a goroutine that was not
// running when verifyNoLeaks was called outlives the test. New and NewFaulty
// call it before registering the cluster's own cleanup: cleanups run last
// registered first, so the check runs after the teardown, and after every
// cleanup the test registered once it had the cluster. Goroutines that
// already ran when the cluster was created (the test's own, or a parallel
// test's) are not blamed; goleak retries for a while, so goroutines still
// winding down after a Close (a NATS connection's read loop, say) are given
// time to exit. It checks nothing once t has failed: a failing test may well
// leave goroutines behind, and their report would only bury the failure.
// In a test that called Parallel, Parallel's check covers the cluster.
func verifyNoLeaks(t testing.TB) {
	if leakcheck.InParallelTest(t) {
		return
	}
	running := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		if !t.Failed() {
			goleak.VerifyNone(t, running)
		}
	})
}

// cleanup tears the cluster down in dependency order: nodes, connections,
// proxies (NewFaulty only, healed first), servers. Nodes are closed
// concurrently, so a large cluster does not pay one leave round per node; a failed Close is an error only for a live node
// on a connected connection, where a graceful leave must succeed (crashed
// and already closed nodes are closed again only to release goroutines).
func (c *Cluster) cleanup(t testing.TB) {
	if c.faults != nil {
		// Nodes must be able to announce their leave and connections to
		// close cleanly, so no fault may outlive the test.
		c.HealAll()
		c.waitNodesReconnected(opTimeout)
	}
	c.mu.Lock()
	nodes := slices.Clone(c.Nodes)
	nodeConns := slices.Clone(c.Conns)
	raw := slices.Clone(c.raw)
	live := slices.Clone(c.live)
	clientLinks := slices.Clone(c.clientLinks)
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			err := n.Close(ctx)
			switch {
			case err == nil:
			case live[i] && nodeConns[i].IsConnected():
				t.Errorf("testcluster: cleanup: close node %s: %v", n.ID(), err)
			default:
				t.Logf("testcluster: cleanup: close stopped node %s: %v", n.ID(), err)
			}
		})
	}
	wg.Wait()

	for _, nc := range slices.Concat(nodeConns, raw) {
		nc.Close()
	}
	for _, l := range clientLinks {
		if l != nil {
			l.Close()
		}
	}
	if c.faults != nil {
		c.faults.closeRouteLinks()
	}
	c.Servers.Shutdown()
}
