// Package natsutil holds the small NATS-facing helpers shared by the pubsub
// packages: validation of topics, node IDs and subject prefixes, the subject
// naming scheme, and recognition of the "no responders" condition.
//
// It deliberately depends only on the NATS client (never on nats-server), so the
// root package can import it without pulling a server into user binaries.
package natsutil

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
)

const (
	// DefaultPrefix is the subject prefix used when none is configured:
	// subjects are then "pubsub.members" and "pubsub.node.<nodeID>".
	DefaultPrefix = "pubsub"

	// MaxTopicLen is the maximum length of a topic name, in bytes.
	MaxTopicLen = 256

	// MaxNodeIDLen is the maximum length of a node ID, in bytes.
	MaxNodeIDLen = 128

	// MaxPrefixLen is the maximum length of a subject prefix, in bytes.
	MaxPrefixLen = 128
)

// Subject tokens below the prefix. They are fixed by the wire contract:
// every node must agree on them, so they are not configurable.
const (
	membersToken = "members"
	nodeToken    = "node"
)

// Values of the status header NATS puts on a reply to a request nobody
// listens to. They mirror the unexported statusHdr and noResponders
// constants of nats.go (nats.go v1.55.0, nats.go: "Status" and "503"): the
// client decodes the inline status of the "NATS/1.0 503" header line into a
// regular "Status" header entry, which is what IsNoRespondersMsg reads.
const (
	statusHeader       = "Status"
	noRespondersStatus = "503"
)

// ValidateTopic reports whether topic is an acceptable topic name: non-empty,
// valid UTF-8, at most MaxTopicLen bytes, without whitespace or control
// characters.
//
// Topics travel in message payloads, never inside NATS subjects, so subject
// metacharacters such as '.', '*' and '>' are allowed. Whitespace and control
// characters are refused because they make topics ambiguous in logs, events
// and tooling, not because NATS would reject them.
func ValidateTopic(topic string) error {
	if topic == "" {
		return errors.New("topic is empty")
	}
	if len(topic) > MaxTopicLen {
		return fmt.Errorf("topic %.32q...: %d bytes, longer than the maximum of %d", topic, len(topic), MaxTopicLen)
	}
	if !utf8.ValidString(topic) {
		return fmt.Errorf("topic %q: not valid UTF-8", topic)
	}
	for i, r := range topic {
		switch {
		case unicode.IsSpace(r):
			return fmt.Errorf("topic %q: contains whitespace at byte %d", topic, i)
		case unicode.IsControl(r):
			return fmt.Errorf("topic %q: contains a control character at byte %d", topic, i)
		}
	}
	return nil
}

// ValidateNodeID reports whether id can name a node. The ID becomes the
// tail of the node's inbox subject, "<prefix>.node.<id>", so it must be a
// valid literal subject suffix: one or more dot-separated tokens, each
// non-empty and made only of ASCII letters, digits, '_' and '-', at most
// MaxNodeIDLen bytes in total. Wildcards ('*', '>') are refused because they
// would turn the inbox into a pattern capturing other nodes' traffic, and
// whitespace because NATS uses it to separate protocol fields.
//
// Dots are allowed because the API contract declares IDs made of
// [a-z0-9-.] valid. They cannot cause a collision: node "a" listens on
// "<prefix>.node.a" and node "a.b" on "<prefix>.node.a.b", and a literal
// subscription matches only its exact subject.
func ValidateNodeID(id string) error {
	return validateTokens("node ID", id, MaxNodeIDLen)
}

// ValidatePrefix reports whether p can be used as the subject prefix: one or
// more dot-separated tokens, each non-empty and made only of ASCII letters,
// digits, '_' and '-', at most MaxPrefixLen bytes in total. Wildcards are
// refused because every node publishes on subjects built from the prefix,
// and NATS does not allow publishing to wildcard subjects.
func ValidatePrefix(p string) error {
	return validateTokens("subject prefix", p, MaxPrefixLen)
}

// validateTokens checks that s is a literal subject fragment: at most max
// bytes of non-empty dot-separated tokens, each matching [A-Za-z0-9_-]+.
// what names s in the error messages.
func validateTokens(what, s string, max int) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > max {
		return fmt.Errorf("%s %.32q...: %d bytes, longer than the maximum of %d", what, s, len(s), max)
	}
	offset := 0
	for tok := range strings.SplitSeq(s, ".") {
		if tok == "" {
			return fmt.Errorf("%s %q: empty token at byte %d (leading, trailing or doubled dot)", what, s, offset)
		}
		if i := invalidTokenByte(tok); i >= 0 {
			return fmt.Errorf("%s %q: invalid character %q at byte %d (allowed: A-Z a-z 0-9 _ - and '.' between tokens)", what, s, tok[i], offset+i)
		}
		offset += len(tok) + 1
	}
	return nil
}

// invalidTokenByte returns the index of the first byte of tok that is not
// allowed in a subject token ([A-Za-z0-9_-]), or -1 when all are allowed.
// Working on bytes is correct because every allowed character is ASCII: any
// byte of a multi-byte UTF-8 sequence is rejected.
func invalidTokenByte(tok string) int {
	for i := 0; i < len(tok); i++ {
		c := tok[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '_', c == '-':
		default:
			return i
		}
	}
	return -1
}

// MembersSubject returns the subject carrying heartbeats and join and leave
// announcements: "<prefix>.members".
func MembersSubject(prefix string) string {
	return prefix + "." + membersToken
}

// NodeSubject returns the inbox subject of node nodeID:
// "<prefix>.node.<nodeID>".
func NodeSubject(prefix, nodeID string) string {
	return prefix + "." + nodeToken + "." + nodeID
}

// NodeSubjectWildcard returns the subject pattern matching every node inbox,
// "<prefix>.node.>". The library never subscribes to it; it exists to
// document (and let operators write) the NATS permissions a node needs. It
// ends in '>' rather than '*' because a node ID may span several tokens
// (see ValidateNodeID).
func NodeSubjectWildcard(prefix string) string {
	return prefix + "." + nodeToken + ".>"
}

// IsNoResponders reports whether err says that a request found no
// subscriber on its subject (nats.ErrNoResponders, possibly wrapped). Right
// after a peer subscribes on another server this can be transient, so
// callers usually retry within their request timeout.
func IsNoResponders(err error) bool {
	return errors.Is(err, nats.ErrNoResponders)
}

// IsNoRespondersMsg reports whether m is the server's "no responders" status
// reply: an empty message whose "Status" header is "503" (nats.go decodes the
// status of the "NATS/1.0 503" header line into that header entry). The test
// is the one nats.go itself applies.
//
// nats.go already turns this reply into nats.ErrNoResponders in
// Conn.Request and in a synchronous subscription's NextMsg; only
// asynchronous subscriptions (a handler or a channel) on a hand-made reply
// subject receive the status message itself, for example when one request
// is sent to several nodes and their replies are gathered on one inbox
// subscription. Such handlers must check every reply with this function.
func IsNoRespondersMsg(m *nats.Msg) bool {
	return m != nil && len(m.Data) == 0 && m.Header.Get(statusHeader) == noRespondersStatus
}
