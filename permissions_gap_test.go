package pubsub

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestJoinFailsFastWhenAMembersInboxIsDenied: a user that may publish on
// <prefix>.node.> except one member's inbox passes Join's probe (on
// <prefix>.node.$probe) and joins in about 50 ms, but cannot work: its sync
// pulls to that member are dropped by the server, so the topics it gains
// answer NOT_READY until RequestTimeout (ErrTopicUnavailable after 5 s),
// and publishes to the member's topics end in ErrTimeout ("outcome
// unknown") after SubscriberTimeout + RequestTimeout. The server's -ERR
// reaches only the connection's error handler. Join now publishes a no-op
// to each member's inbox once it knows the view (checkMemberInboxes) and
// fails with ErrInvalidConfig naming the subject. Failed 3 of 3 before.
func TestJoinFailsFastWhenAMembersInboxIsDenied(t *testing.T) {
	perms := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: readmePub, Deny: []string{"pubsub.node.good"}},
		Subscribe: &server.SubjectPermission{Allow: readmeSub},
	}
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Users: []*server.User{
			{Username: "admin", Password: permPassword},
			{Username: "node", Password: permPassword, Permissions: perms},
		},
	})
	require.NoError(t, err)
	s.Start()
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	require.True(t, s.ReadyForConnections(5*time.Second))
	good := joinT(t, connectAs(t, s, "admin"), "good")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	n, err := Join(ctx, connectAs(t, s, "node"), permOpts("bad")...)
	if n != nil {
		t.Cleanup(func() { _ = n.Close(context.Background()) })
	}
	require.Error(t, err, "Join of a node that may not publish to member good's inbox")
	assert.Less(t, time.Since(start), 3*time.Second)
	assert.True(t, errors.Is(err, ErrInvalidConfig), "error %v does not wrap ErrInvalidConfig", err)
	assert.Contains(t, err.Error(), `"pubsub.node.good"`)
	t.Logf("Join failed after %v: %v", time.Since(start), err)
	// The failed Join took its JOIN back: good does not keep a phantom.
	waitForTest(t, "good dropped the failed joiner", func() bool { return len(good.view().members) == 1 })
}
