package testcluster_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine outlives the tests: the
// cleanup must stop every node, connection, proxy pump and server.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
