package testcluster

import (
	"fmt"
	"math/rand/v2"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// faultyClusterName names the NATS cluster built by NewFaulty.
const faultyClusterName = "pubsub-faulty"

// faults is the proxy layer of a cluster made by NewFaulty.
type faults struct {
	prefix string
	// routes[{i, j}], i < j, carries the one route between servers i and
	// j, dialed by j.
	routes map[[2]int]*faultnet.Link
	// sink is advertised as every server's route address; it refuses every
	// connection. See NewFaulty.
	sink *faultnet.Link
}

// NewFaulty is New with a proxy (a faultnet.Link) on every network path, so
// tests can cut or stall any route or any node's connection:
//
//   - Each pair of servers {i, j}, i < j, has exactly one route, dialed by
//     server j through Route(i, j) to server i's route port. On that link
//     Forward is j→i (dialer to listener) and Backward is i→j; StallRoute
//     picks the direction for you.
//   - Node i's connection goes through Client(i) to its server (i %
//     servers) and nowhere else: it ignores the servers the cluster
//     advertises, so reconnects go through the proxy too, and it retries
//     forever every 50 ms. Unlike New, nodes do not fail over to other
//     servers.
//
// Routes cannot bypass the proxies: servers advertise a refusing address as
// their route URL, so the addresses they gossip to each other lead nowhere,
// and explicit routes are the only ones formed. Route pooling is off
// (Cluster.PoolSize -1), one connection per pair. NewFaulty returns once the
// full route mesh has formed; like New it does not wait for the nodes'
// views to converge.
//
// Connect, and the Forge helpers, still dial servers directly: they observe
// and inject traffic without being subject to faults.
//
// The cleanup heals every link, then tears down nodes, connections, links
// and servers in that order, and checks for leaked goroutines as New's does.
func NewFaulty(t testing.TB, servers, nodes int, opts ...pubsub.Option) *Cluster {
	t.Helper()
	if servers < 1 {
		t.Fatalf("testcluster: %d servers, want at least 1", servers)
	}
	verifyNoLeaks(t)
	f := &faults{prefix: prefixOf(opts), routes: make(map[[2]int]*faultnet.Link)}
	c := &Cluster{Servers: &embedded.Cluster{}, faults: f}
	// Registered first, so a failure half-way through releases what was
	// started; cleanup copes with partial state.
	t.Cleanup(func() { c.cleanup(t) })

	sink, err := faultnet.Listen("127.0.0.1:1") // never dialed: cut below
	if err != nil {
		t.Fatalf("testcluster: sink listener: %v", err)
	}
	sink.Cut()
	f.sink = sink

	for j := range servers {
		// Links to the servers already running: their route ports are known.
		var routes []*url.URL
		for i := range j {
			l, err := faultnet.Listen(c.Servers.Servers[i].ClusterAddr().String())
			if err != nil {
				t.Fatalf("testcluster: route link %d-%d: %v", i, j, err)
			}
			f.routes[[2]int{i, j}] = l
			routes = append(routes, &url.URL{Scheme: "nats-route", Host: l.Addr()})
		}
		s, err := embedded.StartServerWith(func(o *server.Options) {
			o.ServerName = "s" + strconv.Itoa(j)
			o.Cluster = server.ClusterOpts{
				Name:     faultyClusterName,
				Host:     "127.0.0.1",
				Port:     server.RANDOM_PORT,
				PoolSize: -1,
				// Clients must not learn other servers' real addresses.
				NoAdvertise: true,
				// Gossip tells peers to dial this address for implicit
				// routes; the sink refuses them, so only the explicit,
				// proxied routes exist.
				Advertise: sink.Addr(),
			}
			o.Routes = routes
		})
		if err != nil {
			t.Fatalf("testcluster: start server %d: %v", j, err)
		}
		c.Servers.Servers = append(c.Servers.Servers, s)
	}
	c.WaitMeshed(t, opTimeout)
	for i := range nodes {
		c.AddNode(t, "n"+strconv.Itoa(i), i%servers, opts...)
	}
	return c
}

// prefixOf returns the subject prefix a node joined with opts uses.
func prefixOf(opts []pubsub.Option) string {
	var cfg pubsub.Config
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.Prefix == "" {
		return natsutil.DefaultPrefix
	}
	return cfg.Prefix
}

// connectNode opens a node connection through a new link to s.
func (f *faults) connectNode(s *server.Server, opts []nats.Option) (*nats.Conn, *faultnet.Link, error) {
	u, err := url.Parse(s.ClientURL())
	if err != nil {
		return nil, nil, err
	}
	l, err := faultnet.Listen(u.Host)
	if err != nil {
		return nil, nil, err
	}
	// Only the proxy's URL, and discovered servers ignored: a reconnect
	// must not route around the fault.
	opts = append(opts, nats.IgnoreDiscoveredServers())
	nc, err := nats.Connect("nats://"+l.Addr(), opts...)
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	return nc, l, nil
}

// closeRouteLinks closes every route link and the sink.
func (f *faults) closeRouteLinks() {
	for _, l := range f.routes {
		l.Close()
	}
	if f.sink != nil {
		f.sink.Close()
	}
}

// Route returns the link carrying the route between servers i and j (in
// either order). Its Forward direction runs from the higher-numbered server
// (which dials) to the lower-numbered one (which listens). Panics unless the
// cluster was made by NewFaulty and i != j are valid server indexes.
func (c *Cluster) Route(i, j int) *faultnet.Link {
	if c.faults == nil {
		panic("testcluster: Route on a cluster not made by NewFaulty")
	}
	l := c.faults.routes[[2]int{min(i, j), max(i, j)}]
	if l == nil {
		panic(fmt.Sprintf("testcluster: no route link between servers %d and %d", i, j))
	}
	return l
}

// StallRoute stalls only the traffic flowing from server from to server to
// on their route: to stops receiving from from (messages, interest, pings)
// while from still receives from to. Heal it with Route(from, to).Heal or
// HealAll.
func (c *Cluster) StallRoute(from, to int) {
	dir := faultnet.Backward
	if from > to { // the higher index dials: its bytes flow Forward
		dir = faultnet.Forward
	}
	c.Route(from, to).Stall(dir)
}

// Client returns the link carrying node i's NATS connection. Panics unless
// the cluster was made by NewFaulty (or i is out of range).
func (c *Cluster) Client(i int) *faultnet.Link {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.faults == nil {
		panic("testcluster: Client on a cluster not made by NewFaulty")
	}
	return c.clientLinks[i]
}

// HealAll heals every route and client link. Connections closed by a cut
// stay closed and reconnect on their own; wait with WaitMeshed and
// WaitConverged. It does nothing on a cluster made by New.
func (c *Cluster) HealAll() {
	if c.faults == nil {
		return
	}
	for _, l := range c.faults.routes {
		l.Heal()
	}
	c.mu.Lock()
	links := c.clientLinks
	c.mu.Unlock()
	for _, l := range links {
		if l != nil {
			l.Heal()
		}
	}
}

// Meshed reports whether every running server has a route to every other
// running one (NumRoutes counts peers: pooling is off in both New and
// NewFaulty).
func (c *Cluster) Meshed() bool {
	var running []*server.Server
	for _, s := range c.Servers.Servers {
		if s.Running() {
			running = append(running, s)
		}
	}
	for _, s := range running {
		if s.NumRoutes() != len(running)-1 {
			return false
		}
	}
	return true
}

// WaitMeshed waits until Meshed holds, and fails the test with every
// server's route count if it does not within timeout. Use it after healing
// a route that the servers may have closed meanwhile: an explicit route is
// redialed about 1 s after it closed.
func (c *Cluster) WaitMeshed(t testing.TB, timeout time.Duration) {
	t.Helper()
	if waitUntil(timeout, c.Meshed) {
		return
	}
	routes := make([]int, len(c.Servers.Servers))
	for i, s := range c.Servers.Servers {
		routes[i] = s.NumRoutes()
	}
	t.Fatalf("testcluster: route mesh not formed within %v (routes per server: %v)", timeout, routes)
}

// WaitForInterest waits until every running server knows of a subscription
// matching subject, and fails the test otherwise.
func (c *Cluster) WaitForInterest(t testing.TB, subject string, timeout time.Duration) {
	t.Helper()
	if err := c.Servers.WaitForInterest(subject, timeout); err != nil {
		t.Fatalf("testcluster: %v", err)
	}
}

// waitNodesReconnected waits, at most timeout, until every live node's
// connection is connected; it reports nothing, as cleanup tolerates
// stragglers.
func (c *Cluster) waitNodesReconnected(timeout time.Duration) {
	c.mu.Lock()
	var conns []*nats.Conn
	for i, nc := range c.Conns {
		if c.live[i] {
			conns = append(conns, nc)
		}
	}
	c.mu.Unlock()
	waitUntil(timeout, func() bool {
		for _, nc := range conns {
			if !nc.IsConnected() {
				return false
			}
		}
		return true
	})
}

// Prefix returns the subject prefix the cluster's nodes use: the one set
// by WithPrefix among NewFaulty's options, else the default. Clusters made
// by New always report the default.
func (c *Cluster) Prefix() string {
	if c.faults == nil {
		return natsutil.DefaultPrefix
	}
	return c.faults.prefix
}

// Forge publishes data verbatim on subject from a raw connection to server
// server (bypassing every link), and flushes, so the server has processed
// it when Forge returns. Tests use it to play a misbehaving or impersonating
// peer.
func (c *Cluster) Forge(t testing.TB, server int, subject string, data []byte) {
	t.Helper()
	c.checkServer(t, server)
	c.mu.Lock()
	nc := c.forgers[server]
	c.mu.Unlock()
	if nc == nil {
		nc = c.Connect(t, server) // closed by the cleanup
		c.mu.Lock()
		if c.forgers == nil {
			c.forgers = make(map[int]*nats.Conn)
		}
		c.forgers[server] = nc
		c.mu.Unlock()
	}
	if err := nc.Publish(subject, data); err != nil {
		t.Fatalf("testcluster: forge on %q via server %d: %v", subject, server, err)
	}
	if err := nc.FlushTimeout(opTimeout); err != nil {
		t.Fatalf("testcluster: forge on %q via server %d: flush: %v", subject, server, err)
	}
}

// ForgeMembers publishes data verbatim on <prefix>.members via server, as a
// heartbeat, join or leave would be sent (see HeartbeatBytes).
func (c *Cluster) ForgeMembers(t testing.TB, server int, data []byte) {
	t.Helper()
	c.Forge(t, server, natsutil.MembersSubject(c.Prefix()), data)
}

// ForgeToNode publishes data verbatim on node nodeID's inbox,
// <prefix>.node.<nodeID>, via server. Nobody can reply: it is a plain
// publish, not a request.
func (c *Cluster) ForgeToNode(t testing.TB, server int, nodeID string, data []byte) {
	t.Helper()
	c.Forge(t, server, natsutil.NodeSubject(c.Prefix(), nodeID), data)
}

// Heartbeat kinds accepted by HeartbeatBytes: the names of wire.Heartbeat's
// Kind values.
const (
	KindHeartbeat = "HEARTBEAT" // periodic liveness announcement
	KindJoin      = "JOIN"      // a new node asks everyone to answer at once
	KindLeave     = "LEAVE"     // graceful leave: peers drop the sender at once
)

// HeartbeatBytes returns a well-formed envelope for <prefix>.members
// carrying a heartbeat of the given kind (KindHeartbeat, KindJoin,
// KindLeave, or any other name of a wire.Heartbeat_Kind value) from
// incarnation incarnation of node nodeID, claiming view viewID. It panics
// on an unknown kind: that is a bug in the test.
func HeartbeatBytes(kind, nodeID string, incarnation, viewID uint64) []byte {
	k, ok := wire.Heartbeat_Kind_value[kind]
	if !ok {
		panic(fmt.Sprintf("testcluster: unknown heartbeat kind %q", kind))
	}
	env := &wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind:   wire.Heartbeat_Kind(k),
		From:   &wire.MemberRef{NodeId: nodeID, Incarnation: incarnation},
		ViewId: viewID,
	}}}
	b, err := proto.Marshal(env)
	if err != nil {
		panic(fmt.Sprintf("testcluster: marshal heartbeat: %v", err))
	}
	return b
}

// BitFlip returns a copy of data with between 1 and 8 distinct, randomly
// chosen bits flipped (fewer only if data is shorter), so the result always
// differs from data: near-valid garbage for decoders, reproducible from a
// seeded rng. For empty data it returns one random byte.
func BitFlip(data []byte, rng *rand.Rand) []byte {
	if len(data) == 0 {
		return []byte{byte(rng.Uint32())}
	}
	out := append([]byte(nil), data...)
	bits := len(out) * 8
	flipped := make(map[int]bool)
	for n := min(1+rng.IntN(8), bits); len(flipped) < n; {
		bit := rng.IntN(bits)
		if flipped[bit] {
			continue
		}
		flipped[bit] = true
		out[bit/8] ^= 1 << (bit % 8)
	}
	return out
}
