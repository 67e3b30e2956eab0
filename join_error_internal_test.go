package pubsub

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
)

// Every failure of Join wraps one of the package's sentinels (or is ctx's),
// and keeps its cause.
func TestJoinErrorWrapsASentinel(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err, want error
	}{
		{"already a sentinel", fmt.Errorf("%w: the NATS user may not publish", ErrInvalidConfig), ErrInvalidConfig},
		{"ctx's", fmt.Errorf("permission check: %w", context.DeadlineExceeded), context.DeadlineExceeded},
		{"nats timeout", fmt.Errorf("permission check: flush: %w", nats.ErrTimeout), ErrTimeout},
		{"closed", nats.ErrConnectionClosed, ErrClosed},
		{"draining", nats.ErrConnectionDraining, ErrClosed},
		{"anything else NATS says", errors.New("nats: invalid connection"), ErrClosed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := joinError(tc.err)
			assert.ErrorIs(t, got, tc.want)
			assert.ErrorIs(t, got, tc.err, "the cause is kept")
		})
	}
}
