package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestMain lets the test binary act as the example itself when asked to, so
// that the test below runs the example exactly as a user does, in a process
// of its own.
func TestMain(m *testing.M) {
	if os.Getenv("PUBSUB_RUN_EXAMPLE") == "1" {
		// A lighter load than the default: the suite runs under -race, beside
		// other packages' tests.
		os.Args = []string{os.Args[0], "-duration", "2s", "-rate", "5000"}
		main()
		return
	}
	os.Exit(m.Run())
}

func TestExampleRunsAndExitsZero(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole example")
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "PUBSUB_RUN_EXAMPLE=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("example failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "total   produced=") {
		t.Fatalf("example output lacks %q:\n%s", "total   produced=", out)
	}
}
