//go:build soak

package pubsub_test

// A long random run of partitions for KeepMajority: 5 nodes on 3 servers
// (n0, n3 on s0; n1, n4 on s1; n2 on s2), and rounds of clean partitions
// (one server's routes cut, so the sides are {its nodes} and the rest), each
// sometimes right after a heal, before the stable views settle (the split
// brain TestKeepMajorityRepartitionRightAfterAHealServesOneSide pins), and
// crashes with a new node joining in the crashed one's place.
//
//	go test -race -tags soak -run SoakKeepMajority -v .   # PUBSUB_SOAK_SEED=n for another run
//
// Checked: once the views show a partition, the two sides never serve at
// once (sampled for a second); after every heal every node serves again,
// with one stable view everywhere; at the end every topic delivers to
// every subscriber.

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

func TestSoakKeepMajorityPartitions(t *testing.T) {
	opts := append(append([]pubsub.Option{}, fast...), pubsub.WithPartitionPolicy(pubsub.KeepMajority))
	c := testcluster.NewFaulty(t, 3, 5, opts...)
	c.WaitConverged(t, 10*time.Second)
	seed := envUint("PUBSUB_SOAK_SEED", 5)
	t.Logf("seed %d (PUBSUB_SOAK_SEED)", seed)
	r := rand.New(rand.NewPCG(seed, 6))
	servers := len(c.Servers.Servers)
	serverOf := []int{0, 1, 2, 0, 1} // NewFaulty puts node i on server i % servers
	live := func() []*pubsub.Node {
		var out []*pubsub.Node
		for _, i := range c.Live() {
			out = append(out, c.Nodes[i])
		}
		return out
	}
	onServer := func(s int) (in, out []*pubsub.Node) {
		for _, i := range c.Live() {
			if serverOf[i] == s {
				in = append(in, c.Nodes[i])
			} else {
				out = append(out, c.Nodes[i])
			}
		}
		return in, out
	}
	const rounds = 12
	quick := false // the last round healed and the views just converged
	for round := range rounds {
		switch k := r.IntN(5); {
		case k < 4: // a clean partition, right after the last heal half the time
			s := r.IntN(servers)
			a, b := onServer(s)
			t.Logf("round %d: isolate s%d %s(quick %v)", round, s, ids(a), quick)
			isolateServer(c, s)
			waitViews(t, a, b)
			requireNeverBothSidesServe(t, a, b, time.Second)
		default: // a crash, and a new node in its place
			idx := c.Live()[r.IntN(len(c.Live()))]
			id := fmt.Sprintf("r%d", round)
			t.Logf("round %d: crash %s, join %s on s%d", round, c.Nodes[idx].ID(), id, serverOf[idx])
			c.Crash(idx)
			c.AddNode(t, id, serverOf[idx], opts...)
			serverOf = append(serverOf, serverOf[idx])
		}
		c.HealAll()
		c.WaitMeshed(t, 10*time.Second)
		c.WaitConverged(t, 3*faultMemberTimeout)
		quick = r.IntN(2) == 0
		if !quick {
			waitStableEverywhere(t, live(), len(live()))
		}
	}
	nodes := live()
	waitStableEverywhere(t, nodes, len(nodes))
	rec := newRecorder()
	for i, n := range nodes {
		topic := ownedBy(t, n, fmt.Sprintf("soak-%d", i))
		for _, s := range nodes {
			subscribe(t, s, topic, rec.handler)
		}
		publishUntilAccepted(t, nodes[(i+1)%len(nodes)], topic, []byte("end"), len(nodes), 2*faultMemberTimeout)
	}
}

func ids(nodes []*pubsub.Node) string {
	s := ""
	for _, n := range nodes {
		s += n.ID() + " "
	}
	return s
}
