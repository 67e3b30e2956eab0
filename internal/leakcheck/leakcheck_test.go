package leakcheck_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a testing.TB whose cleanups run when the test says so and
// whose errors are recorded, not reported: it lets a test watch a leak
// check fail.
type recorder struct {
	testing.TB
	cleanups []func()
	errors   []string
}

func (r *recorder) Cleanup(f func())  { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Error(args ...any) { r.errors = append(r.errors, fmt.Sprint(args...)) }
func (r *recorder) Errorf(f string, a ...any) {
	r.errors = append(r.errors, fmt.Sprintf(f, a...))
}
func (r *recorder) Failed() bool { return len(r.errors) > 0 }

// runCleanups runs the recorded cleanups last registered first, as testing
// does.
func (r *recorder) runCleanups() {
	for _, f := range slices.Backward(r.cleanups) {
		f()
	}
}

// TestParallelLeakCheckBlamesOnlyItsOwnTest checks the leak check of
// parallel tests: a test's check waits until the other test running beside
// it has torn itself down, so goroutines that test started after the first
// one began are not blamed on it, and a goroutine a test leaves running
// still fails it.
func TestParallelLeakCheckBlamesOnlyItsOwnTest(t *testing.T) {
	first, second := &recorder{TB: t}, &recorder{TB: t}
	leakcheck.AfterOthers(first)
	leakcheck.AfterOthers(second)
	release, others := make(chan struct{}), make(chan struct{})
	go func() { // the second test's, started after the first test began
		defer close(others)
		<-release
	}()

	firstChecked := make(chan struct{})
	go func() {
		defer close(firstChecked)
		first.runCleanups()
	}()
	select {
	case <-firstChecked:
		t.Fatal("the first test's leak check ran while the second test was still running")
	case <-time.After(100 * time.Millisecond): // elapsed time is the point: the check must still be waiting
	}
	close(release)
	<-others
	second.runCleanups()
	<-firstChecked
	if first.Failed() || second.Failed() {
		t.Fatalf("tests that leaked nothing failed their leak checks: %v %v", first.errors, second.errors)
	}

	leaky := &recorder{TB: t}
	leakcheck.AfterOthers(leaky)
	release, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		<-release
	}()
	leaky.runCleanups()
	close(release)
	<-done
	if !leaky.Failed() || !strings.Contains(strings.Join(leaky.errors, "\n"), "TestParallelLeakCheckBlamesOnlyItsOwnTest") {
		t.Fatalf("a goroutine left running by a parallel test did not fail it; errors: %v", leaky.errors)
	}
}

// TestParallelMarksTheTestAndItsSubtests checks what testcluster relies on
// to skip its per-cluster check: a test that called Parallel, and its
// subtests, are reported as parallel; others are not.
func TestParallelMarksTheTestAndItsSubtests(t *testing.T) {
	leakcheck.Parallel(t)
	if !leakcheck.InParallelTest(t) {
		t.Fatal("a test that called Parallel is not reported as parallel")
	}
	t.Run("sub", func(t *testing.T) {
		if !leakcheck.InParallelTest(t) {
			t.Fatal("a subtest of a parallel test is not reported as parallel")
		}
	})
}

func TestSequentialTestIsNotParallel(t *testing.T) {
	if leakcheck.InParallelTest(t) {
		t.Fatal("a test that never called Parallel is reported as parallel")
	}
}
