//go:build soak

package pubsub_test

import (
	"fmt"
	"testing"
)

// TestSoakForgedAndMutatedTrafficStorm runs the storm of
// TestSoakForgedAndMutatedTrafficStormShort ten times longer, under several seeds.
func TestSoakForgedAndMutatedTrafficStorm(t *testing.T) {
	for seed := uint64(1); seed <= 4; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			runStorm(t, stormConfig{seed: seed, record: 1500, storm: 60_000, rounds: 150})
		})
	}
}
