package pubsub

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// A send on a connection the application drained (nc.Drain) fails with
// ErrClosed, as one on a closed connection does: it wrapped no sentinel
// (found by review).
func TestSendOnADrainingConnectionIsErrClosed(t *testing.T) {
	for _, tc := range []struct {
		err    error
		closed bool
	}{
		{nats.ErrConnectionClosed, true},
		{nats.ErrConnectionDraining, true},
		{fmt.Errorf("publish: %w", nats.ErrConnectionDraining), true},
		{nats.ErrMaxPayload, false},
	} {
		t.Run(tc.err.Error(), func(t *testing.T) {
			err := wrapSendErr(tc.err)
			assert.Equal(t, tc.closed, errors.Is(err, ErrClosed), "%v", err)
			assert.ErrorIs(t, err, tc.err)
		})
	}
}

// An Evict naming no valid topic is malformed and ends nothing: an empty
// topic matched a subscription of any topic, so one forged Evict naming a
// subscriber ID (acks and events show them) ended it. A status this
// version cannot name reads HandlerError (found by review).
func TestEvictNamingNoTopicEndsNothing(t *testing.T) {
	a, ctx := oneNodeForTest(t)
	h := func(context.Context, *Message) error { return nil }
	s, err := a.Subscribe(ctx, "t", h)
	require.NoError(t, err)
	before := a.Stats().Malformed
	a.onEvict(&wire.Evict{Topic: "", Subscriber: s.ID().Local, Status: uint32(Timeout)}, "")
	a.onEvict(&wire.Evict{Topic: "a b*", Subscriber: s.ID().Local, Status: uint32(Timeout)}, "")
	select {
	case <-s.Done():
		t.Fatalf("a forged Evict with no valid topic ended the subscription: %v", s.Err())
	default:
	}
	assert.Equal(t, before+2, a.Stats().Malformed)
	a.onEvict(&wire.Evict{}, "") // Join's permission probe: not malformed
	assert.Equal(t, before+2, a.Stats().Malformed, "Join's permission probe counted malformed")

	a.onEvict(&wire.Evict{Topic: "t", Subscriber: s.ID().Local, Status: 99}, "")
	<-s.Done()
	require.ErrorIs(t, s.Err(), ErrEvicted)
	assert.Contains(t, s.Err().Error(), HandlerError.String())
}

// A closing node remembers only LEAVEs of members of its view: any ID a
// forged LEAVE named was kept until the node was gone (found by review).
func TestClosingNodeKeepsOnlyItsMembersLeaves(t *testing.T) {
	owner, pub := ownerAndPublisher(t)
	owner.life.drain.start()
	owner.life.closeCalled.Store(true)
	defer owner.life.closeCalled.Store(false) // Close runs as usual at cleanup
	for i := range 100 {
		owner.onMembers(&nats.Msg{Data: leaveFrom(t, fmt.Sprint("forged-", i))})
	}
	owner.onMembers(&nats.Msg{Data: leaveFrom(t, pub.self.ID)})
	owner.life.drain.mu.Lock()
	defer owner.life.drain.mu.Unlock()
	assert.Equal(t, map[string]bool{pub.self.ID: true}, owner.life.drain.left)
}

func leaveFrom(t *testing.T, id string) []byte {
	data, err := proto.Marshal(&wire.Envelope{Body: &wire.Envelope_Heartbeat{Heartbeat: &wire.Heartbeat{
		Kind: wire.Heartbeat_LEAVE, From: &wire.MemberRef{NodeId: id, Incarnation: 1}}}})
	require.NoError(t, err)
	return data
}
