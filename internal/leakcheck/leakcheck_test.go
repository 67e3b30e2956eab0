package leakcheck_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub/internal/leakcheck"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a testing.TB whose cleanups run when the test says so and
// whose errors are recorded, not reported: it lets a test watch a leak
// check fail.
type recorder struct {
	testing.TB
	name     string
	cleanups []func()
	errors   []string
}

func (r *recorder) Name() string      { return r.name }
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

// TestLeakCheckBlamesOnlyItsOwnTest checks the leak check of parallel
// tests: two tests run side by side, each on its own goroutine; the first
// ends while a goroutine the second started still runs, and passes; the
// second ends with it still running, and fails, its report naming the
// goroutine's function.
func TestLeakCheckBlamesOnlyItsOwnTest(t *testing.T) {
	first := &recorder{TB: t, name: "first"}
	second := &recorder{TB: t, name: "second"}
	releaseFirst, releaseSecond := make(chan struct{}), make(chan struct{})
	firstDone, secondDone := make(chan struct{}), make(chan struct{})
	onTestGoroutine(func() {
		leakcheck.Track(first)
		go blockUntil(releaseFirst, firstDone)
	})
	onTestGoroutine(func() {
		leakcheck.Track(second)
		go blockUntil(releaseSecond, secondDone)
	})

	close(releaseFirst)
	<-firstDone
	onTestGoroutine(first.runCleanups)
	if first.Failed() {
		t.Fatalf("a test that leaked nothing was blamed for the goroutine of the test beside it: %v", first.errors)
	}

	onTestGoroutine(second.runCleanups)
	close(releaseSecond)
	<-secondDone
	if !second.Failed() || !strings.Contains(strings.Join(second.errors, "\n"), "leakcheck_test.blockUntil") {
		t.Fatalf("a goroutine left running by a parallel test did not fail it; errors: %v", second.errors)
	}
}

// blockUntil is a test's goroutine: it runs until release is closed.
func blockUntil(release <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	<-release
}

// onTestGoroutine runs fn on a goroutine of its own, as testing runs each
// test and its cleanups, and waits for it.
func onTestGoroutine(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	<-done
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
