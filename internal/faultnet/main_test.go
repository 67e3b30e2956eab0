package faultnet_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine outlives the tests: Link.Close
// must wait for every pump it started, stalled ones included.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
