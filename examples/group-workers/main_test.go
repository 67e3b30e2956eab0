package main

import (
	"testing"

	"github.com/clusterpubsub/pubsub/internal/examplerun"
)

func TestMain(m *testing.M) { examplerun.Main(m, main) }

func TestExampleRunsAndExitsZero(t *testing.T) {
	examplerun.Check(t, "--- done: every job ran once, each customer on one worker, in order")
}
