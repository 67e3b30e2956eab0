package pubsub

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"
)

// Found in review of e008817: the actor only learned that its lifetime had
// ended (Close gave up, or its node closed) from the lifetime's Done or
// from a *failed* attempt's report. A successful report (here: the owner's
// answer arriving as Close gives up) read before the lifetime's Done was
// resolved, and pump then cut and issued the next queued batch on the dead
// lifetime: with this mock it was published after Close had given up, and
// completed Accepted although Close's contract completes what was not sent
// with ReasonClosed. Through a *Node that attempt is refused at once with
// context.Canceled (ReasonCancelled), which onEvent reads as Close's abort
// of a batch in flight: the never-sent messages completed ReasonTimeout
// ("subscribers may have run it"). The actor's choice between the two
// ready channels is random, so the scenario runs several times.
func TestProducerIssuesNothingAfterItsLifetimeEnded(t *testing.T) {
	for round := range 20 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			mp := newMock()
			cancelled := make(chan struct{})
			mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
				if call == 0 {
					<-ctx.Done() // the owner's answer arrives just as Close gives up
					close(cancelled)
				}
				return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b), Delivered: 1}, nil
			}
			p := newTestProducer(t, mp, ProducerConfig{BatchSize: 1, MaxInFlight: 1, PublishTimeout: time.Hour})
			ctx := prodCtx(t, prodWait)
			first := p.Produce(ctx, pm(0))
			mp.waitStarted(t)
			rest := []*Produced{p.Produce(ctx, pm(1)), p.Produce(ctx, pm(2))}
			cctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := p.Close(cctx); err != nil && err != context.Canceled {
				t.Fatalf("Close = %v", err)
			}
			<-cancelled
			prodAccepted(t, first)
			if n := mp.callCount(); n != 1 {
				t.Errorf("%d publish calls, want 1: %v published after Close gave up", n, mp.recorded()[1:])
			}
			for i, f := range rest {
				ack, err := prodDone(t, f, fmt.Sprintf("message %d", i+1))
				prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
			}
		})
	}
}

// The publish-path twin of TestProducerInterruptedLookingForAnOwnerIsNotPublished:
// a publisher that found no owner before the attempt's context ended
// answers ErrTopicUnavailable wrapping the context's error, as *Node does
// (toOwner): nothing was published, so the message completes ReasonClosed
// when Close gave up, not ReasonTimeout.
func TestProducerAttemptRefusedUntilCloseGaveUpIsNotPublished(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		<-ctx.Done()
		return rejected("test-topic", len(b), fmt.Errorf("%w: no owner (the call's context ended first: %w)", ErrTopicUnavailable, ctx.Err()))
	}
	p := newTestProducer(t, mp, ProducerConfig{PublishTimeout: time.Hour})
	f := p.Produce(prodCtx(t, prodWait), pm(0))
	mp.waitStarted(t)
	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Close(cctx); err != context.Canceled {
		t.Fatalf("Close = %v, want context.Canceled", err)
	}
	ack, err := prodDone(t, f, "message 0")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
}

// Close with a ctx that has already ended has nothing to publish "while ctx
// allows": what is queued completes ReasonClosed and nothing is sent. Close
// nudged the actor before cancelling the lifetime, and the actor, woken in
// between, cut and issued the queued batch; through a *Node that attempt is
// refused with context.Canceled, which reads as Close's abort of a batch
// in flight (ReasonTimeout, "subscribers may have run it").
func TestProducerCloseWithAnEndedCtxSendsNothing(t *testing.T) {
	mp := newMock()
	mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
		if err := ctx.Err(); err != nil { // as *Node: refused before anything is sent
			return rejected("test-topic", len(b), err)
		}
		return PublishAck{Topic: "test-topic", Status: Accepted, Messages: len(b), Delivered: 1}, nil
	}
	p := newTestProducer(t, mp, ProducerConfig{Linger: time.Hour, BatchSize: 100})
	f := p.Produce(prodCtx(t, prodWait), pm(0))
	for { // the actor took the nudge and lingers
		p.mu.Lock()
		parked := p.wakeLen == 100
		p.mu.Unlock()
		if parked {
			break
		}
		runtime.Gosched()
	}
	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = p.Close(cctx)
	ack, err := prodDone(t, f, "message 0")
	prodExpectErr(t, ack, err, ErrClosed, ReasonClosed)
	if n := mp.callCount(); n != 0 {
		t.Fatalf("%d publish calls after a Close whose ctx had ended", n)
	}
}
