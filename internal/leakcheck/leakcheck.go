// Package leakcheck lets the long, waiting-bound integration tests run in
// parallel and still have a goroutine they leak blamed on them.
//
// A per-test leak check that compares the goroutines running after the
// test with those running before it (goleak.IgnoreCurrent) blames a test
// for whatever a test running beside it started meanwhile. Parallel tells
// them apart with a goroutine label: it labels the test's goroutine with the
// test's name, every goroutine started from it inherits the label, and so
// do the goroutines those start (a node's, a NATS connection's, an embedded
// server's). Once the test and its cleanups are over, a goroutine still
// running with its label is its leak, whatever runs beside it.
package leakcheck

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// labelKey is the goroutine label Parallel sets to the test's name.
const labelKey = "leakcheck"

// parallelTests holds the names of the top-level tests that called Parallel.
var parallelTests sync.Map

// Parallel calls t.Parallel, labels t's goroutine (and so every goroutine
// it starts, directly or not) with t's name, and registers a check, run
// after every cleanup the test registers (a test cluster's teardown among
// them), that fails t if a goroutine with that label still runs. Only a
// top-level test may call it, as its first statement. A test that measures
// the heap, counts goroutines or reads any other process-wide figure must
// not call it, since other tests run beside it.
//
// Goroutines the runtime starts on a test's behalf without its label
// (time.AfterFunc's) escape this check; goleak.VerifyTestMain still finds
// them at the end of the package.
func Parallel(t *testing.T) {
	t.Helper()
	if strings.Contains(t.Name(), "/") {
		t.Fatalf("leakcheck.Parallel: %s is a subtest; call it from the top-level test", t.Name())
	}
	t.Parallel()
	parallelTests.Store(t.Name(), struct{}{})
	track(t)
}

// InParallelTest reports whether t is, or runs under, a top-level test that
// called Parallel: a per-cluster check comparing goroutines before and after
// would blame the tests running beside it, and Parallel's check covers the
// cluster anyway.
func InParallelTest(t testing.TB) bool {
	top, _, _ := strings.Cut(t.Name(), "/")
	_, ok := parallelTests.Load(top)
	return ok
}

// track labels the calling goroutine with t's name and registers the
// check. It checks nothing once t has failed: a failing test may well leave
// goroutines behind, and their report would only bury the failure.
func track(t testing.TB) {
	pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels(labelKey, t.Name())))
	t.Cleanup(func() {
		defer pprof.SetGoroutineLabels(context.Background())
		if t.Failed() {
			return
		}
		// Goroutines winding down after a Close (a connection's read
		// loop) are given time to exit.
		var left string
		for wait, deadline := time.Millisecond, time.Now().Add(5*time.Second); ; wait = min(2*wait, 100*time.Millisecond) {
			if left = labelled(t.Name()); left == "" || time.Now().After(deadline) {
				break
			}
			time.Sleep(wait)
		}
		if left != "" {
			t.Errorf("leakcheck: goroutines started by %s still run after it ended:\n%s", t.Name(), left)
		}
	})
}

// labelled returns the stacks of the goroutines, other than the caller,
// that carry the label of test name, as the goroutine profile prints them
// (identical stacks once, with their count), or "" if there are none.
func labelled(name string) string {
	var buf bytes.Buffer
	if err := pprof.Lookup("goroutine").WriteTo(&buf, 1); err != nil {
		return "goroutine profile: " + err.Error()
	}
	want := fmt.Sprintf("%q:%q", labelKey, name)
	var out strings.Builder
	// After its header line, the profile lists each distinct stack as a
	// block: "<count> @ <pcs>", then "# labels: {...}" for a labelled one,
	// then one "#\t<pc>\t<function>\t<file:line>" line per frame.
	_, blocks, _ := strings.Cut(buf.String(), "\n")
	for _, block := range strings.Split(blocks, "\n\n") {
		lines := strings.Split(strings.TrimSpace(block), "\n")
		if len(lines) < 2 || !strings.HasPrefix(lines[1], "# labels: {") || !strings.Contains(lines[1], want) ||
			strings.Contains(block, "leakcheck.track.func") {
			continue
		}
		out.WriteString(block)
		out.WriteString("\n\n")
	}
	return out.String()
}

// RaiseParallel sets -test.parallel to n unless the command line set it,
// and must be called from TestMain after flag.Parse. The default,
// GOMAXPROCS, suits tests that keep a CPU busy; the tests that call
// Parallel mostly wait on timers, so more of them at once shortens the
// suite more than it loads the machine.
func RaiseParallel(n int) {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if f := flag.Lookup("test.parallel"); f != nil && !set {
		if cur, err := strconv.Atoi(f.Value.String()); err == nil && cur < n {
			_ = f.Value.Set(strconv.Itoa(n))
		}
	}
}
