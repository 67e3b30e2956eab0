package pubsub

import (
	"log/slog"
	"sync"
	"time"
)

// nodeLogger is a node's logger and the throttle of its repeating lines.
type nodeLogger struct {
	*slog.Logger
	limit logThrottle
}

// logThrottle lets one log line per key through per interval and counts the
// lines it held back, so a subscriber failing on every message costs one
// line per interval, not one per message.
type logThrottle struct {
	mu       sync.Mutex
	interval time.Duration
	keys     map[string]*throttled
}

type throttled struct {
	at         time.Time
	suppressed int
}

// logThrottleInterval is how often a repeating failure is logged.
const logThrottleInterval = 10 * time.Second

// allow reports whether a line for key may be logged now, and how many were
// held back since the last one.
func (t *logThrottle) allow(key string) (bool, int) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.keys == nil {
		t.keys = make(map[string]*throttled)
	}
	k := t.keys[key]
	if k == nil {
		t.keys[key] = &throttled{at: now}
		return true, 0
	}
	if now.Sub(k.at) < t.interval {
		k.suppressed++
		return false, 0
	}
	n := k.suppressed
	k.at, k.suppressed = now, 0
	return true, n
}

// sweep forgets keys quiet for two intervals.
func (t *logThrottle) sweep() {
	horizon := time.Now().Add(-2 * t.interval)
	t.mu.Lock()
	for key, k := range t.keys {
		if k.at.Before(horizon) {
			delete(t.keys, key)
		}
	}
	t.mu.Unlock()
}
