package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/clusterpubsub/pubsub"
)

// fanout measures a BatchingProducer on node 0 fanning out to one
// subscriber on each of --nodes nodes, the topic owned by node 1, against
// raw NATS fan-out to one subscriber connection per server.
func (b *bench) fanout(ctx context.Context) (res scenarioResult, err error) {
	count, n := b.cfg.countFor(scenarioFanout), b.cfg.nodes
	res = scenarioResult{Name: scenarioFanout, Messages: count, Nodes: n, Subscribers: n}
	raw, err := b.rawThroughput(ctx, scenarioFanout, false, count)
	if err != nil {
		return res, err
	}
	res.Raw = &raw

	var cl cleanup
	defer func() { err = errors.Join(err, cl.run()) }()
	c, err := b.join(ctx, &cl, scenarioFanout, n)
	if err != nil {
		return res, err
	}
	owner := 1 % n
	topic, err := b.topicOwnedBy(c, scenarioFanout, owner)
	if err != nil {
		return res, err
	}
	d := newCounter()
	for _, node := range c.nodes {
		if _, err := subscribe(ctx, node, topic, d); err != nil {
			return res, err
		}
	}
	r, err := b.produce(ctx, &cl, c.nodes[0], topic, d, n, count, scenarioFanout)
	if err != nil {
		return res, err
	}
	r.Ratio = ratio(r.PubSub.DeliveriesPerSec, raw.DeliveriesPerSec)
	r.Notes = fmt.Sprintf("%s, owner n%d; raw: %s%s", plural(n, "node"), owner, plural(len(b.urls), "subscriber conn"), r.Notes)
	res.Results = []result{r}
	return res, nil
}

// local measures a BatchingProducer on a node alone in its cluster
// delivering to --subs subscribers on the same node: nothing crosses NATS,
// and there is no raw baseline.
func (b *bench) local(ctx context.Context) (res scenarioResult, err error) {
	count, subs := b.cfg.countFor(scenarioLocal), b.cfg.subs
	res = scenarioResult{Name: scenarioLocal, Messages: count, Nodes: 1, Subscribers: subs}

	var cl cleanup
	defer func() { err = errors.Join(err, cl.run()) }()
	c, err := b.join(ctx, &cl, scenarioLocal, 1)
	if err != nil {
		return res, err
	}
	topic, err := b.topicOwnedBy(c, scenarioLocal, 0)
	if err != nil {
		return res, err
	}
	d := newCounter()
	for range subs {
		if _, err := subscribe(ctx, c.nodes[0], topic, d); err != nil {
			return res, err
		}
	}
	r, err := b.produce(ctx, &cl, c.nodes[0], topic, d, subs, count, scenarioLocal)
	if err != nil {
		return res, err
	}
	r.Notes = fmt.Sprintf("1 node, %s, no raw baseline%s", plural(subs, "subscriber"), r.Notes)
	res.Results = []result{r}
	return res, nil
}

// group measures a consumer group of one member per node (--nodes), fed
// by a BatchingProducer on node 0, the topic owned by node 1, against a
// NATS queue group of one connection per server.
func (b *bench) group(ctx context.Context) (res scenarioResult, err error) {
	count, n := b.cfg.countFor(scenarioGroup), b.cfg.nodes
	res = scenarioResult{Name: scenarioGroup, Messages: count, Nodes: n, Subscribers: n}
	raw, err := b.rawThroughput(ctx, scenarioGroup, true, count)
	if err != nil {
		return res, err
	}
	res.Raw = &raw

	var cl cleanup
	defer func() { err = errors.Join(err, cl.run()) }()
	c, err := b.join(ctx, &cl, scenarioGroup, n)
	if err != nil {
		return res, err
	}
	owner := 1 % n
	topic, err := b.topicOwnedBy(c, scenarioGroup, owner)
	if err != nil {
		return res, err
	}
	d := newCounter()
	for _, node := range c.nodes {
		if _, err := subscribe(ctx, node, topic, d, pubsub.WithGroup("workers")); err != nil {
			return res, err
		}
	}
	// Each message reaches one member: one delivery per message.
	r, err := b.produce(ctx, &cl, c.nodes[0], topic, d, 1, count, scenarioGroup)
	if err != nil {
		return res, err
	}
	r.Ratio = ratio(r.PubSub.DeliveriesPerSec, raw.DeliveriesPerSec)
	r.Notes = fmt.Sprintf("%s on %s, owner n%d; raw: queue group of %d%s", plural(n, "member"), plural(n, "node"), owner, len(b.urls), r.Notes)
	res.Results = []result{r}
	return res, nil
}

// latency measures one publish at a time from node 0 to a topic owned by
// node 1 with one subscriber on node 2, the three nodes on three servers
// (server i % servers), at each ack level, against raw request/reply from
// server 0 to server 1.
func (b *bench) latency(ctx context.Context) (res scenarioResult, err error) {
	count := b.cfg.countFor(scenarioLatency)
	res = scenarioResult{Name: scenarioLatency, Messages: count, Nodes: 3, Subscribers: 1}
	raw, err := b.rawLatency(ctx, count)
	if err != nil {
		return res, err
	}
	res.Raw = &raw

	var cl cleanup
	defer func() { err = errors.Join(err, cl.run()) }()
	c, err := b.join(ctx, &cl, scenarioLatency, 3)
	if err != nil {
		return res, err
	}
	topic, err := b.topicOwnedBy(c, scenarioLatency, 1)
	if err != nil {
		return res, err
	}
	for _, lvl := range latencyLevels {
		r, err := b.latencyLevel(ctx, c, topic, lvl, count)
		if err != nil {
			return res, fmt.Errorf("%s: %w", lvl.name, err)
		}
		p, q := r.PubSub.Latency, raw.Latency
		r.Ratio = &latency{
			P50:  round(p.P50/q.P50, 4),
			P90:  round(p.P90/q.P90, 4),
			P99:  round(p.P99/q.P99, 4),
			P999: round(p.P999/q.P999, 4),
		}
		res.Results = append(res.Results, r)
	}
	return res, nil
}

// latencyLevel measures count publishes at one ack level, from node 0 to
// topic, with a subscriber of its own on node 2. Then it waits until every
// message reached the subscriber or the subscription ended (an eviction):
// the notes report messages that did not arrive, and why.
func (b *bench) latencyLevel(ctx context.Context, c *cluster, topic string, lvl latencyLevel, count int) (result, error) {
	r := result{Pattern: lvl.name, Notes: lvl.note}
	if lvl.where {
		r.Notes += fmt.Sprintf("; pub n0 (server %d), owner n1 (server %d), sub n2 (server %d)", b.server(0), b.server(1), b.server(2))
	}
	d := newCounter()
	sub, err := subscribe(ctx, c.nodes[2], topic, d)
	if err != nil {
		return r, err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		_ = sub.Unsubscribe(ctx) // the node's Close ends it anyway
	}()
	pub := c.nodes[0]
	msgs := []pubsub.Outgoing{{Data: make([]byte, b.cfg.size)}}

	// Subscribe returned once the owner recorded the subscription, so the
	// first publish reaches it; this checks it and warms the path up. An
	// error no retry mends (a --size over the servers' max_payload) ends
	// the wait at once, reported as it is rather than as the deadline.
	var werr error
	wctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if !poll(wctx, func() bool {
		var ack pubsub.PublishAck
		ack, werr = pub.PublishMessages(wctx, topic, msgs)
		return werr == nil && ack.Delivered == 1 || unmendable(werr)
	}) {
		return r, fmt.Errorf("a publish does not reach the subscriber after %v (last error: %v)", setupTimeout, werr)
	}
	if unmendable(werr) {
		return r, werr
	}
	before := d.got.Load()

	lat := make([]time.Duration, 0, count)
	var done atomic.Int64
	stop := b.prog.start("latency "+lvl.name, int64(count), done.Load)
	for range count {
		t := time.Now()
		ack, err := pub.PublishMessages(ctx, topic, msgs, lvl.opts...)
		lat = append(lat, time.Since(t))
		if err == nil && !lvl.check(ack) {
			err = fmt.Errorf("unexpected ack %+v", ack)
		}
		if err != nil {
			stop()
			return r, err
		}
		done.Add(1)
	}
	stop()
	r.PubSub = measure{Seconds: sumSeconds(lat), Latency: percentiles(lat)}

	// Whatever this level's ack waited for, every message should reach the
	// subscriber: wait for them, or for the subscription to end.
	want := before + int64(count)
	wctx, cancel = context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	poll(wctx, func() bool {
		select {
		case <-sub.Done():
			return true
		default:
			return d.got.Load() >= want
		}
	})
	got := min(d.got.Load()-before, int64(count))
	r.PubSub.Deliveries = got
	if got < int64(count) {
		r.Notes += fmt.Sprintf("; only %d of %d reached the subscriber", got, count)
		if err := sub.Err(); err != nil {
			r.Notes += fmt.Sprintf(" (%v)", err)
		}
	}
	return r, nil
}

// unmendable reports whether a publish's error is one that retrying the
// same publish cannot mend.
func unmendable(err error) bool {
	return errors.Is(err, pubsub.ErrTooLarge) || errors.Is(err, pubsub.ErrInvalidMessage) ||
		errors.Is(err, pubsub.ErrInvalidTopic) || errors.Is(err, pubsub.ErrClosed)
}

// sumSeconds returns the total of lat, in seconds.
func sumSeconds(lat []time.Duration) float64 {
	var sum time.Duration
	for _, l := range lat {
		sum += l
	}
	return sum.Seconds()
}

// subscribe subscribes a handler counting every message into d. The
// subscription ends when its node closes.
func subscribe(ctx context.Context, node *pubsub.Node, topic string, d *counter, opts ...pubsub.SubscribeOption) (*pubsub.Subscription, error) {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	return node.Subscribe(ctx, topic, func(context.Context, *pubsub.Message) error {
		d.add()
		return nil
	}, opts...)
}

// produce runs the producer pattern of --burst or --window: count
// messages of --size bytes through a BatchingProducer on node, until subs
// subscribers counted into d got every accepted message. The producer is
// closed by cl. It returns the pubsub figures; Notes holds the share of
// queue-full rejections, after "; ", for the burst pattern.
func (b *bench) produce(ctx context.Context, cl *cleanup, node *pubsub.Node, topic string, d *counter, subs, count int, scenario string) (result, error) {
	r := result{Pattern: b.cfg.pattern()}
	p, err := pubsub.NewBatchingProducer(node, topic, b.cfg.producerConfig())
	if err != nil {
		return r, err
	}
	cl.add(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		return p.Close(ctx)
	})
	data := make([]byte, b.cfg.size)
	stop := b.prog.start(scenario+" pubsub", int64(count), func() int64 { return d.got.Load() / int64(subs) })
	defer stop()

	var accepted int
	var elapsed time.Duration
	if b.cfg.window > 0 {
		elapsed, err = produceWindow(ctx, p, data, d, subs, count, b.cfg.window)
		accepted = count
	} else {
		elapsed, accepted, err = produceBurst(ctx, p, data, d, subs, count)
	}
	if err != nil {
		return r, err
	}
	deliveries := int64(subs) * int64(accepted)
	r.PubSub = measure{
		Seconds:          elapsed.Seconds(),
		Deliveries:       deliveries,
		DeliveriesPerSec: math.Round(float64(deliveries) / elapsed.Seconds()),
		Accepted:         accepted,
	}
	if b.cfg.window == 0 {
		pct := round(100*float64(count-accepted)/float64(count), 2)
		r.PubSub.QueueFullPct = &pct
		r.Notes = fmt.Sprintf("; %.1f%% queue-full", pct)
	}
	return r, nil
}

// produceBurst is the pattern users try first: count Produce calls in a
// loop, then a wait for the last accepted future. Produce past
// MaxQueueSize returns a future already failed with ErrQueueFull. It waits
// until subs subscribers got every accepted message and returns the time
// that took (checking the futures' outcomes is not counted) and the number
// of accepted messages.
func produceBurst(ctx context.Context, p *pubsub.BatchingProducer, data []byte, d *counter, subs, count int) (time.Duration, int, error) {
	futures := make([]*pubsub.Produced, count)
	// full[i]: Produce returned a future already failed with ErrQueueFull,
	// the producer's queue full. A later ErrQueueFull is an owner's
	// (overloaded: it refused the batch), an error of the run.
	full := make([]bool, count)
	var last *pubsub.Produced
	start := time.Now()
	for i := range futures {
		f := p.Produce(ctx, data)
		futures[i] = f
		if _, err, done := f.Result(); done && errors.Is(err, pubsub.ErrQueueFull) {
			full[i] = true
		} else {
			last = f
		}
	}
	if last != nil {
		if _, err := last.Wait(ctx); err != nil {
			return 0, 0, err
		}
	}
	if err := p.Flush(ctx); err != nil {
		return 0, 0, err
	}
	paused := time.Now()
	accepted := 0
	for i, f := range futures {
		switch _, err, done := f.Result(); {
		case !done:
			return 0, 0, errors.New("a future is not done after Flush")
		case err == nil:
			accepted++
			if err := undelivered(f); err != nil {
				return 0, 0, err
			}
		case !full[i]:
			return 0, 0, err
		}
	}
	pause := time.Since(paused)
	if err := d.wait(ctx, int64(subs)*int64(accepted)); err != nil {
		return 0, 0, err
	}
	return time.Since(start) - pause, accepted, nil
}

// produceWindow is the tuned pattern: a caller bounded by its own queue
// keeps at most window futures outstanding. It waits until subs
// subscribers got every message and returns the time that took.
func produceWindow(ctx context.Context, p *pubsub.BatchingProducer, data []byte, d *counter, subs, count, window int) (time.Duration, error) {
	ring := make([]*pubsub.Produced, min(window, count))
	start := time.Now()
	wait := func(f *pubsub.Produced) error {
		if _, err := f.Wait(ctx); err != nil {
			return err
		}
		return undelivered(f)
	}
	for i := range count {
		if f := ring[i%len(ring)]; f != nil {
			if err := wait(f); err != nil {
				return 0, err
			}
		}
		ring[i%len(ring)] = p.Produce(ctx, data)
	}
	if err := p.Flush(ctx); err != nil {
		return 0, err
	}
	for _, f := range ring {
		if err := wait(f); err != nil {
			return 0, err
		}
	}
	if err := d.wait(ctx, int64(subs)*int64(count)); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// undelivered returns an error naming the subscribers an accepted future's
// batch failed to reach, as its ack reports them: the run then cannot
// count every delivery, and says why instead of waiting out the stall.
func undelivered(f *pubsub.Produced) error {
	ack, _, _ := f.Result()
	if len(ack.Failures) == 0 {
		return nil
	}
	first := ack.Failures[0]
	return fmt.Errorf("a batch of %d messages to %s did not reach %s, the first %s: %s",
		ack.Messages, ack.Topic, plural(len(ack.Failures), "subscriber"), first.Subscriber, first.Status)
}

// plural returns "n thing" or "n things".
func plural(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}
