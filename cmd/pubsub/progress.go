package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// stallTimeout is how long a wait for deliveries accepts no progress at
// all before it gives up.
const stallTimeout = 15 * time.Second

// counter counts deliveries and signals when a target, possibly set after
// the deliveries began, is reached.
type counter struct {
	got    atomic.Int64
	target atomic.Int64
	once   sync.Once
	done   chan struct{}
}

func newCounter() *counter {
	c := &counter{done: make(chan struct{})}
	c.target.Store(math.MaxInt64)
	return c
}

// add counts one delivery.
func (c *counter) add() {
	if c.got.Add(1) == c.target.Load() {
		c.once.Do(func() { close(c.done) })
	}
}

// wait returns once want deliveries were counted. It fails when ctx ends
// first, or when no delivery arrives for stallTimeout.
func (c *counter) wait(ctx context.Context, want int64) error {
	c.target.Store(want)
	if c.got.Load() >= want { // reached before the target was set
		c.once.Do(func() { close(c.done) })
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last, lastChange := c.got.Load(), time.Now()
	for {
		select {
		case <-c.done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("%d of %d deliveries arrived: %w", c.got.Load(), want, context.Cause(ctx))
		case now := <-tick.C:
			if got := c.got.Load(); got != last {
				last, lastChange = got, now
			} else if now.Sub(lastChange) > stallTimeout {
				return fmt.Errorf("%d of %d deliveries arrived, none in the last %v", got, want, stallTimeout)
			}
		}
	}
}

// progressDelay is how long a phase runs before its progress bar appears:
// short phases show none.
const progressDelay = 2 * time.Second

// progress draws progress bars on a terminal; its zero value, or one made
// for a writer that is not a terminal, draws nothing.
type progress struct {
	w io.Writer // nil: disabled
}

// newProgress returns a progress drawing on w if w is a terminal.
func newProgress(w io.Writer) *progress {
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			return &progress{w: w}
		}
	}
	return &progress{}
}

// start shows label's progress, done() of total messages, once the phase
// has run for progressDelay, until the returned stop is called; stop
// erases the bar and returns once it is no longer drawn.
func (p *progress) start(label string, total int64, done func() int64) (stop func()) {
	if p.w == nil || total <= 0 {
		return func() {}
	}
	quit, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		delay := time.NewTimer(progressDelay)
		defer delay.Stop()
		select {
		case <-quit:
			return
		case <-delay.C:
		}
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			p.draw(label, min(done(), total), total)
			select {
			case <-quit:
				fmt.Fprint(p.w, "\r\033[K")
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(quit) })
		<-finished
	}
}

// draw draws one bar of width 30.
func (p *progress) draw(label string, done, total int64) {
	const width = 30
	filled := int(done * width / total)
	fmt.Fprintf(p.w, "\r\033[K%-18s [%s%s] %d/%d messages", label,
		strings.Repeat("=", filled), strings.Repeat(" ", width-filled), done, total)
}
