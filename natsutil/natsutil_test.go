package natsutil

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
)

// The tests use only the standard library: testify's assert package imports
// go.yaml.in/yaml/v3, which go.sum does not list (see the package report).

// checkErr fails t unless err matches want: nil when want is "", otherwise an
// error whose message contains want.
func checkErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("unexpected error: %v", err)
	case want != "" && err == nil:
		t.Fatalf("no error, want one containing %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("error %q does not contain %q", err, want)
	}
}

func TestValidateTopic(t *testing.T) {
	tests := []struct {
		name    string
		topic   string
		wantErr string // substring of the error; "" means valid
	}{
		{"simple", "orders", ""},
		{"contract charset", "orders.eu-1.v2", ""},
		{"subject wildcards allowed", "a.*.>", ""},
		{"punctuation", "a/b:c#d@e", ""},
		{"unicode letters", "commandes-été", ""},
		{"max length", strings.Repeat("a", MaxTopicLen), ""},
		{"max length multibyte", strings.Repeat("é", MaxTopicLen/2), ""},
		{"empty", "", "empty"},
		{"too long", strings.Repeat("a", MaxTopicLen+1), "longer than the maximum"},
		{"too long multibyte", strings.Repeat("é", MaxTopicLen/2) + "a", "longer than the maximum"},
		{"invalid utf8", "a\xffb", "not valid UTF-8"},
		{"truncated utf8", "a\xc3", "not valid UTF-8"},
		{"space", "a b", `topic "a b": contains whitespace at byte 1`},
		{"leading space", " a", "whitespace at byte 0"},
		{"tab", "a\tb", "whitespace at byte 1"},
		{"newline", "ab\n", "whitespace at byte 2"},
		{"carriage return", "a\rb", "whitespace"},
		{"no-break space", "a\u00a0b", "whitespace at byte 1"},
		{"ideographic space", "é\u3000", "whitespace at byte 2"},
		{"nul", "a\x00b", "control character at byte 1"},
		{"escape", "\x1b[31m", "control character at byte 0"},
		{"del", "a\x7f", "control character at byte 1"},
		{"c1 control", "a\u0085", "whitespace"}, // NEL is both space and control; space is reported first
		{"c1 control not space", "a\u0090", "control character at byte 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkErr(t, ValidateTopic(tt.topic), tt.wantErr)
		})
	}
}

// TestValidateTopicLongErrorIsBounded checks that an oversized topic is not
// echoed in full into the error (and from there into logs and events).
func TestValidateTopicLongErrorIsBounded(t *testing.T) {
	err := ValidateTopic(strings.Repeat("x", 100_000))
	checkErr(t, err, "longer than the maximum")
	if n := len(err.Error()); n > 200 {
		t.Fatalf("error message is %d bytes long, want at most 200", n)
	}
}

func TestValidateNodeID(t *testing.T) {
	tests := []struct {
		name    string
		id      string
		wantErr string
	}{
		{"simple", "n1", ""},
		{"all allowed characters", "AZaz09_-", ""},
		{"uuid-like", "3f2a9c1e-7d4b-4e0a-9b1c-2d3e4f5a6b7c", ""},
		{"contract charset with dots", "eu-1.node-7", ""},
		{"max length", strings.Repeat("a", MaxNodeIDLen), ""},
		{"empty", "", "empty"},
		{"too long", strings.Repeat("a", MaxNodeIDLen+1), "longer than the maximum"},
		{"leading dot", ".a", "empty token at byte 0"},
		{"trailing dot", "a.", "empty token at byte 2"},
		{"double dot", "a..b", "empty token at byte 2"},
		{"only dot", ".", "empty token"},
		{"star", "*", "invalid character '*' at byte 0"},
		{"star token", "a.*", "invalid character '*' at byte 2"},
		{"gt", "a>", "invalid character '>' at byte 1"},
		{"space", "a b", "invalid character ' ' at byte 1"},
		{"tab", "a\t", "invalid character '\\t' at byte 1"},
		{"slash", "a/b", "invalid character '/'"},
		{"non-ascii", "é", "invalid character"},
		{"nul", "a\x00", "invalid character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateNodeID(tt.id)
			checkErr(t, err, tt.wantErr)
			if err != nil {
				checkErr(t, err, "node ID")
			}
		})
	}
}

func TestValidatePrefix(t *testing.T) {
	tests := []struct {
		name    string
		prefix  string
		wantErr string
	}{
		{"default", DefaultPrefix, ""},
		{"multi token", "app.eu-1.pubsub_v2", ""},
		{"max length", strings.Repeat("a", MaxPrefixLen), ""},
		{"max length with dots", strings.Repeat("a.", MaxPrefixLen/2-1) + "ab", ""},
		{"empty", "", "empty"},
		{"too long", strings.Repeat("a", MaxPrefixLen+1), "longer than the maximum"},
		{"leading dot", ".a", "empty token at byte 0"},
		{"trailing dot", "a.b.", "empty token at byte 4"},
		{"double dot", "a..b", "empty token at byte 2"},
		{"only dot", ".", "empty token"},
		{"star", "app.*", "invalid character '*' at byte 4"},
		{"gt", "app.>", "invalid character '>' at byte 4"},
		{"gt inside token", "ab>", "invalid character '>' at byte 2"},
		{"space", "my app", "invalid character ' ' at byte 2"},
		{"newline", "a\n", "invalid character"},
		{"non-ascii", "préfixe", "invalid character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidatePrefix(tt.prefix)
			checkErr(t, err, tt.wantErr)
			if err != nil {
				checkErr(t, err, "subject prefix")
			}
		})
	}
}

func TestSubjects(t *testing.T) {
	tests := []struct {
		prefix, node                  string
		members, nodeSubj, nodeWildcd string
	}{
		{DefaultPrefix, "n1", "pubsub.members", "pubsub.node.n1", "pubsub.node.>"},
		{"app.eu", "a-b_c", "app.eu.members", "app.eu.node.a-b_c", "app.eu.node.>"},
		{"x", "eu.n7", "x.members", "x.node.eu.n7", "x.node.>"},
	}
	for _, tt := range tests {
		t.Run(tt.prefix+"/"+tt.node, func(t *testing.T) {
			if got := MembersSubject(tt.prefix); got != tt.members {
				t.Errorf("MembersSubject(%q) = %q, want %q", tt.prefix, got, tt.members)
			}
			if got := NodeSubject(tt.prefix, tt.node); got != tt.nodeSubj {
				t.Errorf("NodeSubject(%q, %q) = %q, want %q", tt.prefix, tt.node, got, tt.nodeSubj)
			}
			if got := NodeSubjectWildcard(tt.prefix); got != tt.nodeWildcd {
				t.Errorf("NodeSubjectWildcard(%q) = %q, want %q", tt.prefix, got, tt.nodeWildcd)
			}
		})
	}
}

// TestSubjectsAreValidForValidInputs checks that subjects built from valid
// inputs are themselves made of valid tokens, and that the members subject
// can never be mistaken for a node inbox.
func TestSubjectsAreValidForValidInputs(t *testing.T) {
	for _, prefix := range []string{DefaultPrefix, "a.b", strings.Repeat("p", MaxPrefixLen)} {
		for _, id := range []string{"n1", "members", "a.b", strings.Repeat("n", MaxNodeIDLen)} {
			checkErr(t, ValidatePrefix(prefix), "")
			checkErr(t, ValidateNodeID(id), "")
			checkErr(t, validateTokens("subject", NodeSubject(prefix, id), 1<<10), "")
			checkErr(t, validateTokens("subject", MembersSubject(prefix), 1<<10), "")
			if MembersSubject(prefix) == NodeSubject(prefix, id) {
				t.Errorf("members subject equals the inbox of node %q", id)
			}
		}
	}
}

func TestIsNoResponders(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"exact", nats.ErrNoResponders, true},
		{"wrapped", fmt.Errorf("request to n2: %w", nats.ErrNoResponders), true},
		{"joined", errors.Join(errors.New("x"), nats.ErrNoResponders), true},
		{"timeout", nats.ErrTimeout, false},
		{"other", errors.New("no responders available for request"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsNoResponders(tt.err); got != tt.want {
				t.Errorf("IsNoResponders(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

func TestIsNoRespondersMsg(t *testing.T) {
	// decoded builds a message the way nats.go does for a status reply: the
	// inline status of the "NATS/1.0 503" line becomes a "Status" header.
	decoded := func(t *testing.T, raw string, data []byte) *nats.Msg {
		t.Helper()
		h, err := nats.DecodeHeadersMsg([]byte(raw))
		if err != nil {
			t.Fatalf("DecodeHeadersMsg(%q): %v", raw, err)
		}
		return &nats.Msg{Header: h, Data: data}
	}
	tests := []struct {
		name string
		msg  func(t *testing.T) *nats.Msg
		want bool
	}{
		{"nil message", func(*testing.T) *nats.Msg { return nil }, false},
		{"decoded 503", func(t *testing.T) *nats.Msg { return decoded(t, "NATS/1.0 503\r\n\r\n", nil) }, true},
		{"decoded 503 with description", func(t *testing.T) *nats.Msg {
			return decoded(t, "NATS/1.0 503 No Responders\r\n\r\n", nil)
		}, true},
		{"header set by hand", func(*testing.T) *nats.Msg {
			return &nats.Msg{Header: nats.Header{"Status": []string{"503"}}}
		}, true},
		{"503 with data", func(t *testing.T) *nats.Msg { return decoded(t, "NATS/1.0 503\r\n\r\n", []byte("x")) }, false},
		{"other status", func(t *testing.T) *nats.Msg { return decoded(t, "NATS/1.0 408\r\n\r\n", nil) }, false},
		{"header key is case-sensitive", func(*testing.T) *nats.Msg {
			return &nats.Msg{Header: nats.Header{"status": []string{"503"}}}
		}, false},
		{"no header", func(*testing.T) *nats.Msg { return &nats.Msg{} }, false},
		{"ordinary empty reply", func(*testing.T) *nats.Msg { return &nats.Msg{Data: []byte{}} }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsNoRespondersMsg(tt.msg(t)); got != tt.want {
				t.Errorf("IsNoRespondersMsg = %v, want %v", got, tt.want)
			}
		})
	}
}
