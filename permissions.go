package pubsub

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
	"github.com/clusterpubsub/pubsub/natsutil"
)

// permProbeToken ends the subject of the probe publish on other nodes'
// inboxes, "<prefix>.node.$probe". '$' is not allowed in node IDs, so no
// node listens there; "<prefix>.node.>" still matches it.
const permProbeToken = "$probe"

// permPollInterval paces the re-checks of the connection's last error while
// the self-request of checkPermissions is in flight.
const permPollInterval = 2 * time.Millisecond

// permProbeBuffer bounds what the probe subscriptions of checkPermissions
// hold while they exist.
const permProbeBuffer = 1024

// permissionsSeeREADME ends every permission error.
const permissionsSeeREADME = "see README 'Subjects and NATS permissions'"

// violationRe extracts the right and the subject from the text nats.go keeps
// for a server's -ERR 'Permissions Violation for Publish to "x"' (or
// "Subscription to").
var violationRe = regexp.MustCompile(`Permissions Violation for (Publish|Subscription) to "([^"]+)"`)

// newViolation returns the right ("publish" or "subscribe") and the subject
// of the permission violation nc last reported, if it is not before (the
// last error when the check started); ok is false otherwise.
func newViolation(nc *nats.Conn, before error) (right, subject string, ok bool) {
	err := nc.LastError()
	if err == nil || err == before || !errors.Is(err, nats.ErrPermissionViolation) {
		return "", "", false
	}
	m := violationRe.FindStringSubmatch(err.Error())
	if m == nil {
		return "", "", false
	}
	if m[1] == "Subscription" {
		return "subscribe", m[2], true
	}
	return "publish", m[2], true
}

// checkPermissions verifies, before the node announces itself, that its NATS
// user may publish and subscribe on every subject the node needs. A missing
// right fails Join with an error wrapping ErrInvalidConfig that names the
// subject and the right.
//
// NATS reports a permission violation asynchronously: the publish or
// subscribe succeeds locally and the server answers with an -ERR, which
// nats.go hands to the connection's async error handler and keeps as
// nc.LastError(). The server handles a connection's protocol in order, so
// the -ERR for a probe arrives before the PONG of a Flush sent after it. The
// check therefore remembers LastError, makes one probe per right (a
// subscription on each subject the node subscribes to, a publish on
// "<prefix>.members" and on "<prefix>.node.$probe"), flushes, and looks for
// a new violation naming one of those subjects. The probe subscriptions
// stand for Join's own (the node's inbox, made before the check, whose
// errors may have arrived before it started; the members subject, made
// after it and after membersAudience) and are removed before the
// self-request below; the members probe is a LEAVE of incarnation 0,
// which every member ignores.
//
// Replies need publish rights on the requesters' reply inboxes, either
// explicit or through allow_responses, which the server grants only for a
// request it delivered. Unless the connection is NoEcho, the node therefore
// also sends itself a request on its own inbox (an empty eviction notice,
// answered with OK and no effect) and waits for the answer on its reply
// subscription: that proves, end to end, the subscriptions on both and the
// right to reply. A NoEcho connection cannot receive its own request, so for
// it the reply right is not checked.
//
// The user's connection handlers are left alone. The check is bounded by
// ctx and by RequestTimeout; on a healthy local connection it takes about
// two round trips (60 µs).
func (n *Node) checkPermissions(parent context.Context) error {
	ctx, cancel := context.WithTimeout(parent, n.cfg.RequestTimeout)
	defer cancel()
	nc := n.nc
	before := nc.LastError()

	replySubject := n.rpc.prefix + "*"
	probeSubject := natsutil.NodeSubject(n.cfg.Prefix, permProbeToken)
	nodeWildcard := natsutil.NodeSubjectWildcard(n.cfg.Prefix)
	inboxPrefix := nc.Opts.InboxPrefix
	if inboxPrefix == "" {
		inboxPrefix = strings.TrimSuffix(nats.InboxPrefix, ".")
	}

	// classify turns a violation on subject into the error Join returns, or
	// reports false when the subject is not one this check probed.
	classify := func(right, subject string) (error, bool) {
		fail := func(grant string) error {
			return fmt.Errorf("%w: the NATS user may not %s %q: grant %s to this user; %s",
				ErrInvalidConfig, right, subject, grant, permissionsSeeREADME)
		}
		switch right {
		case "publish":
			switch {
			case subject == n.members.subject:
				return fail("publish on " + n.members.subject), true
			case subject == probeSubject || subject == n.self.Inbox:
				return fail("publish on " + nodeWildcard + " (other nodes' inboxes)"), true
			case strings.HasPrefix(subject, n.rpc.prefix):
				return fmt.Errorf("%w: the NATS user may not publish %q, a reply to its own request: grant publish on %s.> or allow_responses to this user so it can answer requests; %s",
					ErrInvalidConfig, subject, inboxPrefix, permissionsSeeREADME), true
			}
		case "subscribe":
			switch subject {
			case n.members.subject:
				return fail("subscribe on " + n.members.subject), true
			case n.self.Inbox:
				return fail("subscribe on " + n.self.Inbox + " (or " + nodeWildcard + ")"), true
			case replySubject:
				return fail("subscribe on " + inboxPrefix + ".> (the connection's reply inboxes)"), true
			}
		}
		return nil, false
	}
	// violation looks for a permission error the server sent since the check
	// started about one of the probed subjects.
	violation := func() error {
		right, subject, ok := newViolation(nc, before)
		if !ok {
			return nil
		}
		if perr, ok := classify(right, subject); ok {
			return perr
		}
		return nil
	}

	// Subscribe probes. Channel subscriptions start no goroutine; the
	// messages they collect meanwhile (heartbeats of other members, for a
	// round trip or two) are dropped with the channel, which is far larger
	// than that.
	drop := make(chan *nats.Msg, permProbeBuffer)
	var probes []*nats.Subscription
	unsubscribe := func() {
		for _, sub := range probes {
			_ = sub.Unsubscribe()
		}
		probes = nil
	}
	defer unsubscribe()
	for _, subj := range []string{replySubject, n.self.Inbox, n.members.subject} {
		sub, err := nc.ChanSubscribe(subj, drop)
		if err != nil {
			return fmt.Errorf("permission check: subscribe %s: %w", subj, err)
		}
		probes = append(probes, sub)
	}

	// Publish probes.
	data, err := n.ignoredLeave()
	if err != nil {
		return err
	}
	if err := nc.Publish(n.members.subject, data); err != nil {
		return fmt.Errorf("permission check: publish %s: %w", n.members.subject, err)
	}
	if err := nc.Publish(probeSubject, nil); err != nil {
		return fmt.Errorf("permission check: publish %s: %w", probeSubject, err)
	}

	// The server processes the connection's protocol in order, so the
	// probe subscriptions are gone before the self-request arrives: a second
	// delivery of the request would spend the reply right allow_responses
	// grants (one reply per request by default).
	unsubscribe()

	// The self-request, when the connection can receive it.
	type result struct {
		rep *wire.Reply
		err error
	}
	var replies chan result
	if !nc.Opts.NoEcho {
		replies = make(chan result, 1)
		req, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Evict{Evict: &wire.Evict{}}})
		if err != nil {
			return err
		}
		timeout := n.cfg.RequestTimeout
		if dl, ok := ctx.Deadline(); ok {
			timeout = max(time.Until(dl), time.Millisecond)
		}
		tok := n.rpc.send(n.self.Inbox, req, timeout, func(rep *wire.Reply, err error) { replies <- result{rep, err} })
		defer n.rpc.finish(tok, nil, ErrClosed) // no-op once answered
	}

	var poll *time.Timer
	for {
		if err := nc.FlushWithContext(ctx); err != nil {
			if perr := violation(); perr != nil {
				return perr
			}
			return n.permCheckEnded(parent, err)
		}
		if perr := violation(); perr != nil {
			return perr
		}
		if replies == nil {
			return nil
		}
		if poll == nil {
			poll = time.NewTimer(permPollInterval)
			defer poll.Stop()
		} else {
			poll.Reset(permPollInterval)
		}
		select {
		case res := <-replies:
			if res.err == nil {
				return nil
			}
			// No answer to our own request: a violation the server reported
			// explains it best; look once more after a round trip.
			replies = nil
			ferr := nc.FlushWithContext(ctx)
			if perr := violation(); perr != nil {
				return perr
			}
			if errors.Is(res.err, ErrTimeout) || errors.Is(res.err, context.DeadlineExceeded) {
				return n.permCheckEnded(parent, res.err)
			}
			if ferr != nil {
				return n.permCheckEnded(parent, ferr)
			}
			return fmt.Errorf("permission check: request to own inbox %s: %w", n.self.Inbox, res.err)
		case <-poll.C:
		case <-ctx.Done():
			if perr := violation(); perr != nil {
				return perr
			}
			return n.permCheckEnded(parent, ctx.Err())
		}
	}
}

// ignoredLeave encodes the probe published on the members subject: a LEAVE
// of incarnation 0, which every member ignores.
func (n *Node) ignoredLeave() ([]byte, error) {
	return proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_LEAVE,
		From: &wire.MemberRef{NodeId: n.self.ID, Incarnation: 0},
	}}})
}

// permCheckEnded explains a permission check that ended without a verdict:
// the caller's context ended, the check's own bound passed, or the
// connection failed.
func (n *Node) permCheckEnded(parent context.Context, err error) error {
	if perr := parent.Err(); perr != nil {
		return fmt.Errorf("permission check: %w", perr)
	}
	if errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: permission check got no answer within %v (last error: %v); check that the NATS user may subscribe on %s and on its reply inboxes, and may publish replies (publish on the inbox prefix or allow_responses); %s",
			ErrTimeout, n.cfg.RequestTimeout, err, n.self.Inbox, permissionsSeeREADME)
	}
	return fmt.Errorf("permission check: %w", err)
}

// checkMemberInboxes verifies, once the initial view is known, that the
// node may publish on each member's inbox: a user denied one of them (a
// deny on <prefix>.node.<id> beside an allow on <prefix>.node.>) passes
// checkPermissions, which publishes on <prefix>.node.$probe, and would then
// see its requests to that member vanish: its syncs pulls unanswered (the
// topics it gains never ready) and its publishes there ending in ErrTimeout
// as if their outcome were unknown. Each member gets a JOIN_REPLY listing
// no member, which it ignores (onReplacedNotice), then a Flush: the server
// handles the connection's protocol in order, so a violation's -ERR comes
// before the PONG. Members that join later are not checked.
func (n *Node) checkMemberInboxes(parent context.Context) error {
	nc := n.nc
	before := nc.LastError()
	noop, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_JOIN_REPLY, From: n.selfRef(),
	}}})
	if err != nil {
		return err
	}
	inboxes := map[string]bool{}
	for _, m := range n.view().members {
		if m.ID == n.self.ID {
			continue
		}
		inboxes[m.Inbox] = true
		if err := nc.Publish(m.Inbox, noop); err != nil {
			return fmt.Errorf("permission check: publish %s: %w", m.Inbox, err)
		}
	}
	if len(inboxes) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(parent, n.cfg.RequestTimeout)
	defer cancel()
	if err := nc.FlushWithContext(ctx); err != nil {
		if parent.Err() == nil && !nc.IsClosed() {
			// A reconnect cancels a pending flush (or RequestTimeout ran
			// out on a hung connection): no verdict, and Join goes on, as
			// it did before this check; the violation, if any, still
			// reaches the connection's error handler.
			n.log.Warn("could not check the right to publish on the members' inboxes", "err", err)
			return nil
		}
		return fmt.Errorf("permission check: flush: %w", err)
	}
	if right, subject, ok := newViolation(nc, before); ok && right == "publish" && inboxes[subject] {
		return fmt.Errorf("%w: the NATS user may not publish %q, the inbox of a member: grant publish on %s (every node's inbox) to this user; %s",
			ErrInvalidConfig, subject, natsutil.NodeSubjectWildcard(n.cfg.Prefix), permissionsSeeREADME)
	}
	return nil
}
