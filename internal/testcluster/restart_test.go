package testcluster_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// TestRestartServer checks the rolling-restart helper: each server in turn,
// shut down or in lame duck mode, is replaced by a new one on the same
// client URL, routed to the others, and the nodes converge again.
func TestRestartServer(t *testing.T) {
	c := testcluster.New(t, 3, 3, fastOpts()...)
	c.WaitConverged(t, waitTimeout)
	ldm := func(o *server.Options) {
		o.LameDuckDuration = 500 * time.Millisecond
		o.LameDuckGracePeriod = 100 * time.Millisecond
	}
	for _, stop := range []func(*server.Server){nil, (*server.Server).LameDuckShutdown} {
		for i := range 3 {
			url := c.Servers.URL(i)
			old := c.Servers.Servers[i]
			c.RestartServer(t, i, stop, ldm)
			if c.Servers.Servers[i] == old || c.Servers.URL(i) != url {
				t.Fatalf("server %d not replaced on %s: now %s", i, url, c.Servers.URL(i))
			}
			for j, s := range c.Servers.Servers {
				if s.NumRoutes() != 2 {
					t.Errorf("server %d has %d routes after restarting %d, want 2", j, s.NumRoutes(), i)
				}
			}
		}
	}
	testcluster.WaitFor(t, waitTimeout, func() bool {
		for _, nc := range c.Conns {
			if !nc.IsConnected() {
				return false
			}
		}
		return true
	}, "nodes not reconnected")
	c.WaitConverged(t, waitTimeout)
}
