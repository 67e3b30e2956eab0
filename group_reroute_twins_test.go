package pubsub_test

import (
	"testing"

	"github.com/clusterpubsub/pubsub"
)

// Two members' shares of one batch, both failed with MailboxFull, are
// re-routed to the same third member; the messages are distinct but equal
// (same data, no key). Each share must run there: the second is not a copy
// of the first, though it has the same producer number and fingerprint.
// Before the re-routed share's positions were kept beside its fingerprint,
// the second was answered Delivered without running (x ran twice of 3).
func TestGroupTwoReroutedSharesOfEqualMessagesBothRun(t *testing.T) {
	c := newCluster(t, 3, 3)
	topic := ownedBy(t, c.Nodes[1], "reroute-twins")
	runs := stuckMembers(t, c, topic, "X1", "X2")
	ack, err := c.Nodes[0].PublishMessages(ctxT(t), topic, []pubsub.Outgoing{{Data: []byte("x")}, {Data: []byte("x")}, {Data: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	// Delivered: Y reported after its handler ran each share.
	got := runs.of("x")
	t.Logf("ack %+v; ran x %v", ack, got)
	if ack.Delivered != 1 || len(ack.Failures) != 0 {
		t.Fatalf("the group's shares were not all re-routed and delivered: ack %+v", ack)
	}
	if len(got) != 3 {
		t.Errorf("group ran x %d times %v; the batch had 3 (ack %+v)", len(got), got, ack)
	}
}
