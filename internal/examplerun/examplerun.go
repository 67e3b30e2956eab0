// Package examplerun lets an example's test run the example exactly as a
// user does: the test binary re-executes itself as the example program, in a
// process of its own, and the test checks its exit status and output.
package examplerun

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

const envVar = "PUBSUB_RUN_EXAMPLE"

// Main is the example package's TestMain: run by Check, the binary runs
// main with args instead of the tests.
func Main(m *testing.M, main func(), args ...string) {
	if os.Getenv(envVar) == "1" {
		os.Args = append([]string{os.Args[0]}, args...)
		main()
		return
	}
	os.Exit(m.Run())
}

// Check runs the example and fails t unless it exits 0 with want in its output.
func Check(t *testing.T, want string) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the whole example")
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envVar+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("example failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), want) {
		t.Fatalf("example output lacks %q:\n%s", want, out)
	}
}
