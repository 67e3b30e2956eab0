package pubsub_test

import (
	"flag"
	"testing"

	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The tests that call leakcheck.Parallel wait on timers far more than
	// they use a CPU: four at a time (TESTING.md).
	leakcheck.RaiseParallel(4)
	goleak.VerifyTestMain(m)
}
