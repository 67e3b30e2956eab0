package pubsub

import (
	"context"
	"errors"
	"sort"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const permPassword = "s3cret"

// permUser describes one restricted NATS user of a permission test.
type permUser struct {
	pub, sub       []string
	allowResponses bool
}

// startAuthServer starts an embedded NATS server with the user "admin"
// (every right) and the user "node" with u's rights.
func startAuthServer(t *testing.T, u permUser) *server.Server {
	t.Helper()
	perms := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: u.pub},
		Subscribe: &server.SubjectPermission{Allow: u.sub},
	}
	if u.allowResponses {
		perms.Response = &server.ResponsePermission{MaxMsgs: 1, Expires: time.Minute}
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
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	require.True(t, s.ReadyForConnections(5*time.Second), "server not ready")
	return s
}

func connectAs(t *testing.T, s *server.Server, user string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	// The expected violations would otherwise reach nats.go's default
	// handler, which prints them.
	quiet := nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})
	opts = append([]nats.Option{nats.UserInfo(user, permPassword), quiet}, opts...)
	nc, err := nats.Connect(s.ClientURL(), opts...)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	return nc
}

// permOpts keeps membership quick; the long MemberTimeout keeps a phantom
// member, if one were ever announced, visible for the whole test.
func permOpts(id string) []Option {
	return []Option{
		WithNodeID(id),
		WithHeartbeatInterval(50 * time.Millisecond),
		WithMemberTimeout(10 * time.Second),
		WithRequestTimeout(5 * time.Second),
	}
}

func joinT(t *testing.T, nc *nats.Conn, id string) *Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n, err := Join(ctx, nc, permOpts(id)...)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		assert.NoError(t, n.Close(ctx))
	})
	return n
}

func memberIDs(n *Node) []string {
	var ids []string
	for _, m := range n.Members() {
		ids = append(ids, m.ID)
	}
	sort.Strings(ids)
	return ids
}

// The README's permissions for the default prefix.
var (
	readmePub = []string{"pubsub.members", "pubsub.node.>", "_INBOX.>"}
	readmeSub = []string{"pubsub.members", "pubsub.node.>", "_INBOX.>"}
)

// TestJoinWithLeastPrivilege checks that the permissions the README documents
// (and their variants: allow_responses, a custom inbox prefix, subscribe on
// the node's own inbox only) let two restricted nodes join and exchange a
// message in both directions.
func TestJoinWithLeastPrivilege(t *testing.T) {
	tests := []struct {
		name   string
		user   permUser
		inbox  string // custom inbox prefix, "" for _INBOX
		noEcho bool
	}{
		{name: "readme", user: permUser{pub: readmePub, sub: readmeSub}},
		{name: "allow_responses", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>"},
			sub: readmeSub, allowResponses: true,
		}},
		{name: "custom inbox prefix", inbox: "_MY.x", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>", "_MY.x.>"},
			sub: []string{"pubsub.members", "pubsub.node.>", "_MY.x.>"},
		}},
		{name: "custom inbox prefix with allow_responses", inbox: "_MY.x", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>"},
			sub: []string{"pubsub.members", "pubsub.node.>", "_MY.x.>"}, allowResponses: true,
		}},
		{name: "no echo with allow_responses", noEcho: true, user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>"},
			sub: readmeSub, allowResponses: true,
		}},
		{name: "subscribe on own inbox only", user: permUser{
			pub: readmePub,
			sub: []string{"pubsub.members", "pubsub.node.a", "pubsub.node.b", "_INBOX.>"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startAuthServer(t, tt.user)
			var opts []nats.Option
			if tt.inbox != "" {
				opts = append(opts, nats.CustomInboxPrefix(tt.inbox))
			}
			if tt.noEcho {
				opts = append(opts, nats.NoEcho())
			}
			a := joinT(t, connectAs(t, s, "node", opts...), "a")
			b := joinT(t, connectAs(t, s, "node", opts...), "b")
			for _, n := range []*Node{a, b} {
				require.Eventually(t, func() bool { return len(n.Members()) == 2 }, 10*time.Second, 5*time.Millisecond,
					"%s sees %v", n.ID(), memberIDs(n))
			}

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			// Each node subscribes to a topic and the other publishes on it,
			// on two topics, so both nodes own one or the other and every
			// kind of node-to-node request crosses NATS.
			for i, pair := range [][2]*Node{{a, b}, {b, a}} {
				sub, pub := pair[0], pair[1]
				got := make(chan string, 1)
				topic := []string{"t1", "t2"}[i]
				_, err := sub.Subscribe(ctx, topic, func(_ context.Context, m *Message) error {
					got <- string(m.Data)
					return nil
				})
				require.NoError(t, err)
				ack, err := pub.Publish(ctx, topic, []byte("hello "+topic))
				require.NoError(t, err)
				require.Equal(t, Accepted, ack.Status, "ack %+v", ack)
				require.Equal(t, 1, ack.Delivered, "ack %+v", ack)
				require.Equal(t, "hello "+topic, <-got)
			}
		})
	}
}

// TestJoinFailsFastWithoutPermissions checks that a node whose user lacks a
// right the node needs fails Join quickly, with an error wrapping
// ErrInvalidConfig that names the subject and the right, without leaving a
// phantom member behind.
func TestJoinFailsFastWithoutPermissions(t *testing.T) {
	tests := []struct {
		name    string
		user    permUser
		inbox   string
		noEcho  bool
		subject string // the error names it (a prefix of it is enough)
		right   string
	}{
		{name: "no publish on node inboxes", subject: `"pubsub.node.`, right: "publish", user: permUser{
			pub: []string{"pubsub.members", "_INBOX.>"}, sub: readmeSub,
		}},
		{name: "no publish on other nodes' inboxes", subject: `"pubsub.node.$probe"`, right: "publish", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.bad", "_INBOX.>"}, sub: readmeSub,
		}},
		{name: "no publish on members", subject: `"pubsub.members"`, right: "publish", user: permUser{
			pub: []string{"pubsub.node.>", "_INBOX.>"}, sub: readmeSub,
		}},
		{name: "no publish on members, no echo", noEcho: true, subject: `"pubsub.members"`, right: "publish", user: permUser{
			pub: []string{"pubsub.node.>", "_INBOX.>"}, sub: readmeSub,
		}},
		{name: "no subscribe on members", subject: `"pubsub.members"`, right: "subscribe", user: permUser{
			pub: readmePub, sub: []string{"pubsub.node.>", "_INBOX.>"},
		}},
		{name: "no subscribe on own inbox", subject: `"pubsub.node.bad"`, right: "subscribe", user: permUser{
			pub: readmePub, sub: []string{"pubsub.members", "pubsub.node.other", "_INBOX.>"},
		}},
		{name: "custom inbox prefix without subscribe", inbox: "_MY.x", subject: `"_MY.x.`, right: "subscribe", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>", "_MY.x.>"}, sub: readmeSub,
		}},
		{name: "no right to reply", subject: `"_INBOX.`, right: "publish", user: permUser{
			pub: []string{"pubsub.members", "pubsub.node.>"}, sub: readmeSub,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startAuthServer(t, tt.user)
			good := joinT(t, connectAs(t, s, "admin"), "good")

			var opts []nats.Option
			if tt.inbox != "" {
				opts = append(opts, nats.CustomInboxPrefix(tt.inbox))
			}
			if tt.noEcho {
				opts = append(opts, nats.NoEcho())
			}
			nc := connectAs(t, s, "node", opts...)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			start := time.Now()
			n, err := Join(ctx, nc, permOpts("bad")...)
			took := time.Since(start)
			t.Logf("Join failed in %v: %v", took, err)
			require.Error(t, err)
			require.Nil(t, n)
			assert.Less(t, took, 3*time.Second, "Join must fail well within RequestTimeout (5s)")
			assert.True(t, errors.Is(err, ErrInvalidConfig), "error %v does not wrap ErrInvalidConfig", err)
			assert.Contains(t, err.Error(), tt.subject)
			assert.Contains(t, err.Error(), "may not "+tt.right)
			assert.Contains(t, err.Error(), "Subjects and NATS permissions")

			// The failed node announced nothing: a node joining afterwards
			// is the only other member the good node ever sees. The good
			// node handles members messages in order, so anything the
			// failed node had sent would be seen before the later joiner.
			late := joinT(t, connectAs(t, s, "admin"), "late")
			require.Eventually(t, func() bool { return len(good.Members()) >= 2 }, 10*time.Second, 5*time.Millisecond)
			assert.Equal(t, []string{"good", "late"}, memberIDs(good))
			assert.Equal(t, []string{"good", "late"}, memberIDs(late))
		})
	}
}

// TestCheckPermissionsRespectsContext checks that a cancelled context ends
// the check at once with the context's error.
func TestCheckPermissionsRespectsContext(t *testing.T) {
	s := startAuthServer(t, permUser{pub: readmePub, sub: readmeSub})
	n := joinT(t, connectAs(t, s, "node"), "a")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := n.checkPermissions(ctx)
	require.ErrorIs(t, err, context.Canceled)
	require.NoError(t, n.checkPermissions(context.Background()))
}

// BenchmarkCheckPermissions measures the check on a healthy local
// connection with the README's permissions.
func BenchmarkCheckPermissions(b *testing.B) {
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Users: []*server.User{{Username: "node", Password: permPassword, Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: readmePub},
			Subscribe: &server.SubjectPermission{Allow: readmeSub},
		}}},
	})
	require.NoError(b, err)
	s.Start()
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	require.True(b, s.ReadyForConnections(5*time.Second))
	nc, err := nats.Connect(s.ClientURL(), nats.UserInfo("node", permPassword))
	require.NoError(b, err)
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n, err := Join(ctx, nc, permOpts("a")...)
	require.NoError(b, err)
	defer func() { _ = n.Close(ctx) }()
	b.ResetTimer()
	for b.Loop() {
		if err := n.checkPermissions(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
