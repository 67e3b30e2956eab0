//go:build soak

package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/faultnet"
)

// TestSoakChurn publishes from several nodes while nodes join, crash and
// leave, and checks that every accepted message reached every subscriber that
// lived through the whole run, or that its ack said it did not, and that
// each publisher's accepted messages arrived in order. Run it with
//
//	go test -race -tags soak -run Soak -timeout 20m .      (PUBSUB_SOAK=2m for longer)
func TestSoakChurn(t *testing.T) {
	duration := 45 * time.Second
	if d, err := time.ParseDuration(os.Getenv("PUBSUB_SOAK")); err == nil {
		duration = d
	}
	c := newCluster(t, 3, 4)
	const topics = 8
	rec := newRecorder()
	// Nodes 0 and 1 stay up and hold the subscribers that are checked.
	var stable []pubsub.SubscriberID
	topicOf := map[pubsub.SubscriberID]string{}
	for i := 0; i < topics; i++ {
		topic := fmt.Sprintf("soak-%d", i)
		for _, n := range c.Nodes[:2] {
			id := subscribe(t, n, topic, rec.handler).ID()
			stable = append(stable, id)
			topicOf[id] = topic
		}
		subscribe(t, c.Nodes[2], topic, rec.handler)
		subscribe(t, c.Nodes[3], topic, rec.handler)
	}
	type sent struct {
		topic, data string
		ack         pubsub.PublishAck
	}
	var mu sync.Mutex
	var accepted []sent
	rejected := map[pubsub.Reason]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w, n := range c.Nodes[:2] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				topic := fmt.Sprintf("soak-%d", i%topics)
				data := fmt.Sprintf("p%d-%07d", w, i)
				ack, err := n.Publish(context.Background(), topic, []byte(data))
				mu.Lock()
				if err != nil {
					if !errors.Is(err, ack.Reason.Err()) {
						t.Errorf("error %v does not match reason %s", err, ack.Reason)
					}
					rejected[ack.Reason]++
				} else {
					accepted = append(accepted, sent{topic, data, ack})
				}
				mu.Unlock()
			}
		}()
	}
	// A pipelined producer on a stable node: its messages must keep their
	// order at every stable subscriber of its topic.
	pipeRec := newRecorder()
	var pipeSubs []*pubsub.Subscription
	for _, n := range c.Nodes[:2] {
		pipeSubs = append(pipeSubs, subscribe(t, n, "soak-pipelined", pipeRec.handler))
	}
	producer, err := pubsub.NewBatchingProducer(c.Nodes[0], "soak-pipelined", pubsub.ProducerConfig{
		MaxInFlight: 4, BatchSize: 50, Linger: time.Millisecond,
		OnPublishError: func(int, error) pubsub.ErrorDecision { return pubsub.FailBatchAndContinue },
	})
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f := producer.Produce(context.Background(), []byte(fmt.Sprintf("q-%07d", i)))
			if i%200 == 199 {
				_, _ = f.Wait(context.Background()) // keep the queue short
			}
		}
	}()
	deadline := time.Now().Add(duration)
	r := rand.New(rand.NewPCG(1, 2))
	churn := 0
	for time.Now().Before(deadline) {
		// Add a node, then take one of the added ones away, by crash or close.
		n := c.AddNode(t, fmt.Sprintf("churn%d", churn), churn%3, fast...)
		idx := len(c.Nodes) - 1
		subscribe(t, n, fmt.Sprintf("soak-%d", churn%topics), rec.handler)
		c.WaitConverged(t, 10*time.Second)
		if r.IntN(2) == 0 {
			c.Crash(idx)
		} else {
			c.CloseNode(t, idx)
		}
		c.WaitConverged(t, 10*time.Second)
		churn++
	}
	close(stop)
	wg.Wait()

	if err := producer.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, s := range pipeSubs {
		msgs := pipeRec.of(s.ID())
		reordered := 0
		for i := 1; i < len(msgs); i++ {
			if msgs[i] <= msgs[i-1] {
				reordered++
			}
		}
		t.Logf("pipelined producer: %s got %d messages, %d out of order", s.ID(), len(msgs), reordered)
		if reordered > 0 {
			t.Errorf("pipelined producer's messages out of order at %s", s.ID())
		}
	}
	got := map[pubsub.SubscriberID]map[string]int{}
	for _, id := range stable {
		got[id] = map[string]int{}
		last := map[byte]string{}
		for i, d := range rec.of(id) {
			got[id][d] = i
			if prev, ok := last[d[1]]; ok && prev > d {
				t.Errorf("%s received %s after %s: out of order", id, d, prev)
			}
			last[d[1]] = d
		}
	}
	missing := 0
	for _, s := range accepted {
		for _, id := range stable {
			if topicOf[id] != s.topic {
				continue
			}
			if _, ok := got[id][s.data]; ok {
				continue
			}
			if _, reported := failureOf(s.ack, id); !reported {
				missing++
				if missing < 10 {
					t.Errorf("%s accepted (%+v) but %s neither got it nor was reported", s.data, s.ack, id)
				}
			}
		}
	}
	t.Logf("%d churn rounds; %d publishes accepted, rejected by reason %v; %d silently missing", churn, len(accepted), rejected, missing)
}

// TestSoakFaults runs the fault tests' workload (every node publishing
// sequentially to topics owned by every node, subscribers everywhere) through
// random network faults on a proxied 3-server cluster: one-way and two-way
// route stalls, route cuts and node connection cuts of 1 to 4 s. After each
// heal every topic must serve every live subscription within
// 2 x MemberTimeout (+2 s on a loaded machine); at the end no ack may claim
// more deliveries than happened and every publisher's order must hold.
//
//	go test -race -tags soak -run SoakFaults -timeout 20m .   (PUBSUB_SOAK=2m for longer)
func TestSoakFaults(t *testing.T) {
	duration := 45 * time.Second
	if d, err := time.ParseDuration(os.Getenv("PUBSUB_SOAK")); err == nil {
		duration = d
	}
	c := newFaultyCluster(t)
	l := newFaultLoad(t, c)
	l.start()
	r := rand.New(rand.NewPCG(3, 4))
	faults := []struct {
		name   string
		inject func(a, b int)
	}{
		{"route stalled one way", func(a, b int) { c.StallRoute(a, b) }},
		{"route stalled both ways", func(a, b int) { c.Route(a, b).Stall(faultnet.Both) }},
		{"route cut", func(a, b int) { c.Route(a, b).Cut() }},
		{"client cut", func(a, _ int) { c.Client(a).Cut() }},
	}
	rounds := 0
	for deadline := time.Now().Add(duration); time.Now().Before(deadline); rounds++ {
		f := faults[r.IntN(len(faults))]
		a := r.IntN(3)
		b := (a + 1 + r.IntN(2)) % 3
		hold := time.Second + time.Duration(r.IntN(3000))*time.Millisecond
		f.inject(a, b)
		time.Sleep(hold) // the fault's duration is the point
		c.HealAll()
		healed := l.waitServing(t, 2*faultMemberTimeout+2*time.Second, fmt.Sprint(rounds))
		t.Logf("round %d: %s (%d, %d) for %v; serving again %v after the heal", rounds, f.name, a, b, hold, healed)
	}
	l.stopPublishers()
	l.checkHonest(t)
	t.Logf("%d fault rounds", rounds)
}
