//go:build soak

package pubsub_test

import (
	"fmt"
	"testing"

	"github.com/clusterpubsub/pubsub"
)

// The kept-copy fault probes' whole matrices (kept_fault_probe_test.go
// runs one case of each): a route stall from the owner to the publisher,
// each delivery mode and ack level, with and without copies; a slow
// at-least-once subscriber on the publisher's node at both waiting levels;
// the publisher replaced by a node with its ID, in each delivery mode.
func TestSoakKeptCopies(t *testing.T) {
	t.Run("stall", keptStallMatrix)
	t.Run("slow", func(t *testing.T) { keptSlowSubscriber(t, pubsub.AckDelivered, pubsub.AckAccepted) })
	for _, mode := range []pubsub.DeliveryMode{pubsub.AtMostOnce, pubsub.AtLeastOnce} {
		t.Run("replaced/"+mode.String(), func(t *testing.T) { keptReplacedProbe(t, mode) })
	}
	t.Run("server-loss", func(t *testing.T) {
		keptServerLoss(t, []int{0, 1}, []pubsub.DeliveryMode{pubsub.AtMostOnce, pubsub.AtLeastOnce},
			[]pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted})
	})
}

// keptStallMatrix runs keptStallProbe for each delivery mode and ack
// level, with and without copies.
func keptStallMatrix(t *testing.T) {
	for _, copies := range []bool{true, false} {
		for _, mode := range []pubsub.DeliveryMode{pubsub.AtMostOnce, pubsub.AtLeastOnce} {
			for _, level := range []pubsub.AckLevel{pubsub.AckDelivered, pubsub.AckAccepted} {
				name := fmt.Sprintf("%v/%v", mode, level)
				if !copies {
					name = "no copies/" + name
				}
				t.Run(name, func(t *testing.T) { keptStallProbe(t, mode, level, copies) })
			}
		}
	}
}
