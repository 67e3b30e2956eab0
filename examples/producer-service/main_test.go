package main

import (
	"testing"

	"github.com/clusterpubsub/pubsub/internal/examplerun"
)

// A lighter load than the default: the suite runs under -race, beside other
// packages' tests.
func TestMain(m *testing.M) { examplerun.Main(m, main, "-duration", "2s", "-rate", "5000") }

func TestExampleRunsAndExitsZero(t *testing.T) {
	examplerun.Check(t, "total   produced=")
}
