package testcluster_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// cleanupRecorder is a testing.TB whose cleanups run when the test says so
// and whose errors are recorded, not reported: it lets a test watch the
// cluster's cleanup fail.
type cleanupRecorder struct {
	testing.TB
	cleanups []func()
	errors   []string
}

func (r *cleanupRecorder) Cleanup(f func())  { r.cleanups = append(r.cleanups, f) }
func (r *cleanupRecorder) Error(args ...any) { r.errors = append(r.errors, fmt.Sprint(args...)) }
func (r *cleanupRecorder) Errorf(f string, a ...any) {
	r.errors = append(r.errors, fmt.Sprintf(f, a...))
}
func (r *cleanupRecorder) Failed() bool { return len(r.errors) > 0 }

// runCleanups runs the recorded cleanups last registered first, as testing
// does.
func (r *cleanupRecorder) runCleanups() {
	for _, f := range slices.Backward(r.cleanups) {
		f()
	}
}

// TestCleanupFailsOnALeakedGoroutine checks the per-test leak check: a
// goroutine started after the cluster and still running when the cluster
// has been torn down fails the test, and the cluster's own goroutines do
// not.
func TestCleanupFailsOnALeakedGoroutine(t *testing.T) {
	clean := &cleanupRecorder{TB: t}
	testcluster.New(clean, 1, 1)
	clean.runCleanups()
	if clean.Failed() {
		t.Fatalf("a cluster torn down with nothing leaked fails its test: %v", clean.errors)
	}

	leaky := &cleanupRecorder{TB: t}
	testcluster.New(leaky, 1, 1)
	release := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-release
	}()
	leaky.runCleanups()
	close(release)
	<-done
	if !leaky.Failed() || !strings.Contains(strings.Join(leaky.errors, "\n"), "TestCleanupFailsOnALeakedGoroutine") {
		t.Fatalf("a goroutine left running did not fail the test naming it; errors: %v", leaky.errors)
	}
}
