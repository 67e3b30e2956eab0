package pubsub_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clusterpubsub/pubsub"
	"github.com/clusterpubsub/pubsub/internal/testcluster"
)

// A group member that fails its own share and then a share re-routed to it
// in the same batch is listed once in the ack: a DeliveryFailure is a
// subscriber that did not process the batch, not one per share. X's mailbox
// is full, so its share goes to Y, which fails its own share: both time out
// (at most once: not re-routed again), or the first fails in its handler
// and the ack comes at the publisher's deadline with the re-routed share
// still out.
func TestGroupMemberFailingTwoSharesIsListedOnce(t *testing.T) {
	for _, tc := range []struct {
		name     string
		deadline time.Duration // of the Publish call; 0: none
		want     pubsub.DeliveryStatus
	}{
		{name: "both shares time out", want: pubsub.Timeout},
		{name: "answered at the deadline", deadline: time.Second, want: pubsub.HandlerError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 3, 3, pubsub.WithSilentWaitForTest(), pubsub.WithSubscriberTimeout(500*time.Millisecond))
			topic := ownedBy(t, c.Nodes[1], "twice-failed")
			runs := &memberRuns{ran: map[string][]string{}}
			subscribeHeldMember(t, c, topic, runs, nil)
			yHeld := make(chan struct{})
			var yOnce sync.Once
			releaseY := func() { yOnce.Do(func() { close(yHeld) }) }
			t.Cleanup(releaseY)
			var yRuns atomic.Int32
			y, err := c.Nodes[0].Subscribe(ctxT(t), topic, func(_ context.Context, m *pubsub.Message) error {
				runs.record("Y", m)
				if !strings.HasPrefix(string(m.Data), "p") {
					return nil
				}
				if yRuns.Add(1) == 1 && tc.want == pubsub.HandlerError {
					return errors.New("refused")
				}
				<-yHeld
				return nil
			}, pubsub.WithGroup("g"))
			require.NoError(t, err)
			fillMailboxes(t, c, topic, runs, "X")

			ctx := ctxT(t)
			if tc.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.deadline)
				defer cancel()
			}
			ack, err := c.Nodes[0].PublishMessages(ctx, topic, []pubsub.Outgoing{{Data: []byte("p0")}, {Data: []byte("p1")}})
			require.NoError(t, err)
			t.Logf("ack %+v; ran p0 %v p1 %v", ack, runs.of("p0"), runs.of("p1"))
			assert.Equal(t, 0, ack.Delivered, "the group did not process the batch")
			var ys []pubsub.DeliveryStatus
			for _, f := range ack.Failures {
				assert.Equal(t, "g", f.Group)
				assert.NotEqual(t, pubsub.MailboxFull, f.Status, "X's share was not re-routed: the test did not run what it names")
				if f.Subscriber == y.ID() {
					ys = append(ys, f.Status)
				}
			}
			require.NotEmpty(t, ys, "Y's failure is missing: the test did not run what it names")
			assert.Equal(t, []pubsub.DeliveryStatus{tc.want}, ys, "Y's entries in %+v", ack.Failures)
			if tc.want == pubsub.HandlerError {
				// X's share did reach Y: it runs once Y is released (a timed
				// out one is dropped from the mailbox).
				releaseY()
				testcluster.WaitFor(t, 5*time.Second, func() bool { return yRuns.Load() == 2 }, "Y never got X's share")
			}
		})
	}
}
