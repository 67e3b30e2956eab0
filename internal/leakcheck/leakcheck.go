// Package leakcheck lets the long, waiting-bound integration tests run in
// parallel and still have a goroutine they leak blamed on them.
//
// A per-test leak check (goleak.VerifyNone against the goroutines running
// when the test began) blames a test for whatever a test running beside it
// started since. Parallel keeps the check exact: a parallel test holds a
// gate shared while it runs, and its check takes the gate exclusively, so
// the check runs only once every other parallel test running then has torn
// itself down, and no new one starts until it is over. A goroutine the check
// finds then belongs to the test checking, or to one that already failed its
// own check.
package leakcheck

import (
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"
)

// gate is held shared by each running parallel test and exclusively by each
// parallel test's leak check.
var gate sync.RWMutex

// parallelTests holds the names of the top-level tests that called Parallel.
var parallelTests sync.Map

// Parallel calls t.Parallel and registers a leak check for the whole test,
// run after every cleanup the test registers (a test cluster's teardown
// among them): it fails t if a goroutine started since the call still runs.
// Only a top-level test may call it, as its first statement. A test that
// measures the heap, counts goroutines or reads any other process-wide
// figure must not call it, since another test runs beside it.
//
// The tests that call it spend their time waiting on timers (a partition
// held for several member timeouts, a route stalled until deliveries time
// out), not on the CPU, so running them two at a time (-parallel defaults
// to GOMAXPROCS) shortens the suite without loading the machine more than a
// second copy of the test binary would.
func Parallel(t *testing.T) {
	t.Helper()
	if strings.Contains(t.Name(), "/") {
		t.Fatalf("leakcheck.Parallel: %s is a subtest; call it from the top-level test", t.Name())
	}
	t.Parallel()
	parallelTests.Store(t.Name(), struct{}{})
	afterOthers(t)
}

// InParallelTest reports whether t is, or runs under, a top-level test that
// called Parallel: a per-cluster leak check inside it would blame the test
// running beside it, and Parallel's check covers the cluster anyway.
func InParallelTest(t testing.TB) bool {
	top, _, _ := strings.Cut(t.Name(), "/")
	_, ok := parallelTests.Load(top)
	return ok
}

// afterOthers holds the gate shared until t's last cleanup, which then
// takes it exclusively and fails t if a goroutine started since the call
// still runs. It checks nothing once t has failed: a failing test may well
// leave goroutines behind, and their report would only bury the failure.
func afterOthers(t testing.TB) {
	gate.RLock()
	running := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		gate.RUnlock()
		gate.Lock()
		defer gate.Unlock()
		if !t.Failed() {
			// A parallel test that starts while this one checks waits in
			// afterOthers for the gate: its goroutine is not a leak.
			goleak.VerifyNone(t, running, goleak.IgnoreAnyFunction("github.com/clusterpubsub/pubsub/internal/leakcheck.afterOthers"))
		}
	})
}
