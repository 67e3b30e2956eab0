// Package embedded starts NATS servers inside the current process, for the
// quickstart, the examples and the tests: a single server, or several servers
// joined by routes into one NATS cluster, as a production deployment would be.
//
// It imports nats-server, so only programs that really want an in-process
// server should import it; the pubsub package itself never does.
package embedded

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

const (
	// host is the interface every embedded server listens on: loopback only,
	// so tests never expose a port to the network.
	host = "127.0.0.1"

	// clusterName names the routed cluster built by StartCluster.
	clusterName = "pubsub-embedded"

	// readyTimeout bounds the wait for a server to accept connections and for
	// a cluster's route mesh to form.
	readyTimeout = 10 * time.Second

	// pollInterval is how often the waits of this package re-check their
	// condition. Routes and interest propagate within about a millisecond on
	// loopback, so a short interval keeps tests fast at negligible cost.
	pollInterval = time.Millisecond
)

// baseOptions returns the options every embedded server shares: loopback,
// a random client port, no logging, and no signal handlers (the host process
// owns SIGINT/SIGTERM, and several servers cannot all install handlers).
func baseOptions() *server.Options {
	return &server.Options{
		Host:   host,
		Port:   server.RANDOM_PORT,
		NoLog:  true,
		NoSigs: true,
	}
}

// start creates and starts a server with opts and waits until it accepts
// connections. On failure no server is left running.
func start(opts *server.Options) (*server.Server, error) {
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded: create NATS server: %w", err)
	}
	s.Start() // does not block
	if !s.ReadyForConnections(readyTimeout) {
		s.Shutdown()
		s.WaitForShutdown()
		return nil, fmt.Errorf("embedded: NATS server %q not ready for connections after %v", opts.ServerName, readyTimeout)
	}
	return s, nil
}

// StartServer starts one standalone NATS server listening on a random port
// of 127.0.0.1 and returns once it accepts connections. Connect to it with
// s.ClientURL(); stop it with s.Shutdown() followed by s.WaitForShutdown().
func StartServer() (*server.Server, error) {
	return start(baseOptions())
}

// StartServerWith starts one NATS server with the options StartServer uses,
// after configure has adjusted them, and returns once it accepts
// connections. It lets tests build topologies StartCluster does not, such as
// routes through fault-injecting proxies; configure may set any field,
// including the ones StartServer chooses.
func StartServerWith(configure func(opts *server.Options)) (*server.Server, error) {
	opts := baseOptions()
	configure(opts)
	return start(opts)
}

// Cluster is a set of embedded NATS servers joined by routes into one NATS
// cluster: a message published on any server reaches subscribers on every
// other one. Servers[i] is named "s<i>".
type Cluster struct {
	// Servers holds the cluster's servers in start order. Tests may shut
	// single servers down to simulate failures; Cluster's methods tolerate it.
	Servers []*server.Server
}

// StartCluster starts n NATS servers (n >= 1) on random loopback ports and
// joins them into a full mesh of routes. Servers 1..n-1 are seeded with the
// route address of server 0 and discover each other by gossip. It returns
// once every server has a route to every other one; if the mesh does not form
// within 10 seconds, it shuts all servers down and returns an error.
//
// Route pooling is disabled (Cluster.PoolSize -1) so that each pair of
// servers shares exactly one route connection: NumRoutes then counts peers,
// which is what the mesh check needs, and the cluster uses fewer sockets.
func StartCluster(n int) (*Cluster, error) {
	if n < 1 {
		return nil, fmt.Errorf("embedded: cluster size %d, want at least 1", n)
	}
	c := &Cluster{Servers: make([]*server.Server, 0, n)}
	for i := range n {
		opts := baseOptions()
		opts.ServerName = "s" + strconv.Itoa(i)
		opts.Cluster = server.ClusterOpts{
			Name:     clusterName,
			Host:     host,
			Port:     server.RANDOM_PORT,
			PoolSize: -1,
		}
		if i > 0 {
			// Server 0 has been ready since the previous iteration, so its
			// route listener, hence its random port, is known.
			seed := c.Servers[0].ClusterAddr()
			if seed == nil {
				c.Shutdown()
				return nil, errors.New("embedded: server s0 has no route listener")
			}
			opts.Routes = server.RoutesFromStr("nats://" + net.JoinHostPort(host, strconv.Itoa(seed.Port)))
		}
		s, err := start(opts)
		if err != nil {
			c.Shutdown()
			return nil, err
		}
		c.Servers = append(c.Servers, s)
	}
	meshed := func() bool {
		for _, s := range c.Servers {
			if s.NumRoutes() != n-1 {
				return false
			}
		}
		return true
	}
	if !Poll(readyTimeout, meshed) {
		routes := make([]int, n)
		for i, s := range c.Servers {
			routes[i] = s.NumRoutes()
		}
		c.Shutdown()
		return nil, fmt.Errorf("embedded: route mesh of %d servers not formed after %v (routes per server: %v)", n, readyTimeout, routes)
	}
	return c, nil
}

// URLs returns the client URL of every server, in server order. The URLs of
// servers that were shut down are included, so indexes stay stable.
func (c *Cluster) URLs() []string {
	urls := make([]string, len(c.Servers))
	for i, s := range c.Servers {
		urls[i] = s.ClientURL()
	}
	return urls
}

// URL returns the client URL of server i.
func (c *Cluster) URL(i int) string {
	return c.Servers[i].ClientURL()
}

// Shutdown shuts every server down and waits until each has finished, so no
// server goroutine or listener outlives the call. It is idempotent and may be
// called after some servers were already shut down individually.
func (c *Cluster) Shutdown() {
	// Stop them all before waiting for any, so the servers do not spend the
	// shutdown trying to reconnect routes to peers that are going away anyway.
	for _, s := range c.Servers {
		s.Shutdown() // idempotent in nats-server
	}
	for _, s := range c.Servers {
		s.WaitForShutdown() // returns at once once a server has finished
	}
}

// WaitForInterest waits until every running server of the cluster knows of a
// subscription matching subject, whichever server it was made on. A
// subscription is registered on its own server by the time Flush returns,
// but reaches the other servers asynchronously over the routes; until then a
// message published elsewhere is silently dropped and a request fails with
// nats.ErrNoResponders. Servers that were shut down are skipped. It returns an
// error naming the servers still without interest after timeout.
func (c *Cluster) WaitForInterest(subject string, timeout time.Duration) error {
	missing := func() []string {
		var names []string
		for _, s := range c.Servers {
			if s.Running() && !s.GlobalAccount().SubscriptionInterest(subject) {
				names = append(names, s.Name())
			}
		}
		return names
	}
	if Poll(timeout, func() bool { return len(missing()) == 0 }) {
		return nil
	}
	// Re-check rather than report a stale list: interest may have arrived
	// between the last poll and now.
	if m := missing(); len(m) > 0 {
		return fmt.Errorf("embedded: no interest in %q on servers %v after %v", subject, m, timeout)
	}
	return nil
}

// Poll evaluates cond every millisecond until it holds or timeout elapses,
// and reports whether it held: the way to wait for a condition in a test
// instead of sleeping. cond is evaluated at least once, and once more after
// the deadline has passed, so a zero timeout is a plain check.
func Poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pollInterval)
	}
}
