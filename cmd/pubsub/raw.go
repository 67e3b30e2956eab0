package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// probeReply marks the probes a raw publisher sends, before measuring,
// until every subscriber received one: a message with this reply subject
// is a probe, not counted as a delivery. A probe reaching a subscriber
// proves that the publisher's server routes the subject to it.
const probeReply = "_pubsub_bench_probe"

// errRawLost is the cause of a raw NATS run that lost deliveries.
var errRawLost = errors.New("deliveries lost")

// rawThroughput measures raw NATS core on the servers before any node
// joins: one subscriber connection per server on subject <prefix>.raw.*
// (members of one queue group if queue), and one publisher on server 0
// publishing count messages of --size bytes, one NATS message each. It
// returns the deliveries per second, counted from the first publish until
// every subscriber (or, for a queue group, the group) got every message.
func (b *bench) rawThroughput(ctx context.Context, scenario string, queue bool, count int) (m measure, err error) {
	var cl cleanup
	defer func() {
		if cerr := cl.run(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	subject := b.rawSubject(scenario)
	d := newCounter()
	probed := make([]atomic.Bool, len(b.urls))
	// Raw NATS core has no flow control: a subscriber connection that falls
	// max_pending bytes behind its publisher is closed by its server (a slow
	// consumer), and what was pending is lost. The client reconnects, so the
	// loss would otherwise surface only as a stall; end the run at once
	// and name the cause.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	for i := range b.urls {
		lost := nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			cancel(fmt.Errorf("%w: raw subscriber connection %d was disconnected from %s (%v): raw NATS has no flow control, "+
				"and %s; if the server's log says so, try a smaller --count or --size", errRawLost, i, redactURLs(b.urls[i]), err, slowConsumerHint))
		})
		nc, err := b.connect(i, fmt.Sprintf("raw-%s-sub%d", scenario, i), lost)
		if err != nil {
			return m, err
		}
		cl.add(func() error { nc.Close(); return nil })
		handler := func(msg *nats.Msg) {
			if msg.Reply == probeReply {
				probed[i].Store(true)
				return
			}
			d.add()
		}
		var sub *nats.Subscription
		if queue {
			sub, err = nc.QueueSubscribe(subject, "workers", handler)
		} else {
			sub, err = nc.Subscribe(subject, handler)
		}
		if err != nil {
			return m, err
		}
		if err := sub.SetPendingLimits(-1, -1); err != nil { // measure throughput, not drops
			return m, err
		}
		if err := nc.Flush(); err != nil {
			return m, err
		}
	}
	pub, err := b.connect(0, "raw-"+scenario+"-pub")
	if err != nil {
		return m, err
	}
	cl.add(func() error { pub.Close(); return nil })
	if err := b.waitProbes(ctx, pub, subject, probed); err != nil {
		return m, err
	}

	want := int64(count)
	if !queue {
		want *= int64(len(b.urls))
	}
	data := make([]byte, b.cfg.size)
	stop := b.prog.start(scenario+" raw NATS", int64(count), func() int64 { return d.got.Load() * int64(count) / want })
	defer stop()
	start := time.Now()
	for i := range count {
		if err := pub.Publish(subject, data); err != nil {
			return m, err
		}
		if i%4096 == 0 && ctx.Err() != nil {
			return m, fmt.Errorf("raw NATS: %w", context.Cause(ctx))
		}
	}
	if err := pub.Flush(); err != nil {
		return m, err
	}
	if err := d.wait(ctx, want); err != nil {
		return m, fmt.Errorf("raw NATS: %w", err)
	}
	elapsed := time.Since(start)
	if got := d.got.Load(); got != want {
		return m, fmt.Errorf("raw NATS: %d deliveries of %d messages, want %d", got, count, want)
	}
	return measure{
		Seconds:          elapsed.Seconds(),
		Deliveries:       want,
		DeliveriesPerSec: math.Round(float64(want) / elapsed.Seconds()),
	}, nil
}

// waitProbes publishes probes on subject from pub until every subscriber
// flagged in probed received one, or setupTimeout passes.
func (b *bench) waitProbes(ctx context.Context, pub *nats.Conn, subject string, probed []atomic.Bool) error {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	var perr error
	all := func() bool {
		if perr = pub.PublishRequest(subject, probeReply, nil); perr != nil {
			return true
		}
		for i := range probed {
			if !probed[i].Load() {
				return false
			}
		}
		return true
	}
	if !poll(ctx, all) {
		return fmt.Errorf("the publisher's server does not route %s to all %d subscribers after %v", subject, len(probed), setupTimeout)
	}
	return perr
}

// rawLatency measures count raw NATS request/reply round trips, requester
// on server 0, responder on server 1, payload --size bytes, one at a time.
func (b *bench) rawLatency(ctx context.Context, count int) (m measure, err error) {
	var cl cleanup
	defer func() {
		if cerr := cl.run(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	subject := b.rawSubject(scenarioLatency)
	// A lost connection loses the request in flight: end the run at once
	// and name the loss, as rawThroughput does, rather than wait out the
	// request's timeout and report a bare "nats: timeout".
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	lost := func(name string, i int) nats.Option {
		return nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			cancel(fmt.Errorf("raw latency connection %s was disconnected from %s (%v)", name, redactURLs(b.urls[i]), err))
		})
	}
	responder, err := b.connect(b.server(1), "raw-latency-responder", lost("raw-latency-responder", b.server(1)))
	if err != nil {
		return m, err
	}
	cl.add(func() error { responder.Close(); return nil })
	if _, err := responder.Subscribe(subject, func(msg *nats.Msg) { _ = msg.Respond(msg.Data) }); err != nil {
		return m, err
	}
	if err := responder.Flush(); err != nil {
		return m, err
	}
	requester, err := b.connect(0, "raw-latency-requester", lost("raw-latency-requester", 0))
	if err != nil {
		return m, err
	}
	cl.add(func() error { requester.Close(); return nil })
	data := make([]byte, b.cfg.size)

	// The first request that finds the responder ends the wait for
	// interest; until then they fail at once with no responders. Any other
	// error (a --size over the server's max_payload) no retry mends: it
	// ends the wait at once and is the one reported, not the deadline.
	wctx, wcancel := context.WithTimeout(ctx, setupTimeout)
	defer wcancel()
	var rerr error
	poll(wctx, func() bool {
		_, rerr = requester.RequestWithContext(wctx, subject, data)
		return !errors.Is(rerr, nats.ErrNoResponders)
	})
	switch {
	case rerr == nil:
	case errors.Is(rerr, nats.ErrNoResponders) || wctx.Err() != nil:
		return m, fmt.Errorf("raw request/reply does not get through after %v: %w", setupTimeout, rerr)
	default:
		return m, fmt.Errorf("raw request: %w", rerr)
	}

	lat := make([]time.Duration, 0, count)
	var done atomic.Int64
	stop := b.prog.start("latency raw NATS", int64(count), done.Load)
	defer stop()
	for range count {
		t := time.Now()
		rctx, rcancel := context.WithTimeout(ctx, closeTimeout)
		_, err := requester.RequestWithContext(rctx, subject, data)
		rcancel()
		if err != nil {
			return m, fmt.Errorf("raw request: %w", cmp.Or(context.Cause(ctx), err))
		}
		lat = append(lat, time.Since(t))
		done.Add(1)
	}
	return measure{Seconds: sumSeconds(lat), Latency: percentiles(lat)}, nil
}

// percentiles sorts lat and returns its p50, p90, p99 and p99.9 in
// microseconds.
func percentiles(lat []time.Duration) *latency {
	slices.Sort(lat)
	at := func(q float64) float64 {
		i := min(int(float64(len(lat))*q), len(lat)-1)
		return float64(lat[i].Nanoseconds()) / 1e3
	}
	return &latency{P50: at(0.50), P90: at(0.90), P99: at(0.99), P999: at(0.999)}
}
