package pubsub

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
)

// Produced is the future of one produced message. It completes once, with
// the PublishAck of the message's batch (Accepted, shared by every message of
// the batch) or with an error and a Rejected ack whose Reason matches it:
// errors.Is(err, ack.Reason.Err()) holds. Futures of one producer complete
// in produce order, except those already done when Produce returns. Treat
// the ack's Failures as read-only: the batch's futures share it.
type Produced struct {
	topic *string                       // the producer's (8 bytes, not a string header: a deep queue holds a million futures)
	res   atomic.Pointer[produceResult] // set once, before done is closed
	mu    sync.Mutex                    // guards done
	done  chan struct{}                 // made by the first Done before completion
}

type produceResult struct {
	ack PublishAck
	err error
}

// closedDone is the Done channel of every future completed before anyone
// asked for its channel.
var closedDone = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// Done returns a channel closed once the message's outcome is known.
func (f *Produced) Done() <-chan struct{} {
	if f.res.Load() != nil {
		return closedDone
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done == nil {
		if f.res.Load() != nil {
			return closedDone
		}
		f.done = make(chan struct{})
	}
	return f.done
}

// Wait returns the message's outcome once it is known. If ctx ends first,
// Wait returns ctx's error with a Rejected ack (ReasonCancelled, or
// ReasonTimeout for a deadline); the message itself is not affected and may
// still be published.
func (f *Produced) Wait(ctx context.Context) (PublishAck, error) {
	if r := f.res.Load(); r != nil {
		return r.ack, r.err
	}
	select {
	case <-f.Done():
		r := f.res.Load()
		return r.ack, r.err
	case <-ctx.Done():
		// The message may still be published: only this wait ended.
		return rejected(*f.topic, 1, fmt.Errorf("pubsub: waiting for a produced message: %w", ctx.Err()))
	}
}

// Result returns the message's outcome and true once it is known, and
// false without blocking before.
func (f *Produced) Result() (PublishAck, error, bool) {
	if r := f.res.Load(); r != nil {
		return r.ack, r.err, true
	}
	return PublishAck{}, nil, false
}

// complete sets the outcome; it is called once per future.
func (f *Produced) complete(r *produceResult) {
	f.res.Store(r)
	f.mu.Lock()
	if f.done != nil {
		close(f.done)
	}
	f.mu.Unlock()
}

// doneFuture returns a future already completed with r.
func doneFuture(r *produceResult) *Produced {
	f := &Produced{topic: &r.ack.Topic}
	f.res.Store(r)
	return f
}

// failure is a per-message result: a Rejected ack for one message and err.
func (p *BatchingProducer) failure(err error) *produceResult {
	ack, err := rejected(p.topic, 1, err)
	return p.result(ack, err)
}

// result is an outcome of p's: its ack carries p's AckLevel, as a batch's
// does, whether the message was published or not (DESIGN: "a producer's
// futures carry its AckLevel in Level").
func (p *BatchingProducer) result(ack PublishAck, err error) *produceResult {
	ack.Level = p.cfg.AckLevel
	return &produceResult{ack: ack, err: err}
}
