package pubsub

import (
	"strings"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// An owner's answer to a request, and its form on the wire.

// ownerAnswer is an owner's answer to a subscribe or publish, local or remote.
type ownerAnswer struct {
	code   wire.Reply_Code
	viewID uint64
	ack    PublishAck
	owner  string         // stats answers
	counts map[string]int // stats answers: subscribers per node
	groups map[string]int // stats answers: members per group
	// delivered lists the delivered subscribers, when the publish asked
	// (a chunk of a split batch).
	delivered []SubscriberID
	// unreported: the subscribers listed Timeout because the answer went
	// at the publisher's deadline before their node reported
	// (answerEarly): their delivery goes on.
	unreported map[SubscriberID]bool
	// reason says why a refusal (NOT_READY, OVERLOADED) was given, when
	// it is not the usual one (the owner not ready for the topic yet).
	reason string
}

func (ans ownerAnswer) wire() *wire.Reply {
	rep := &wire.Reply{Code: ans.code, ViewId: ans.viewID, Owner: ans.owner, Error: ans.reason}
	if ans.code == wire.Reply_OK {
		rep.Ack = ackToWire(ans.ack)
		for i, f := range ans.ack.Failures {
			rep.Ack.Failures[i].Unreported = ans.unreported[f.Subscriber]
		}
		for _, id := range ans.delivered {
			rep.Ack.DeliveredTo = append(rep.Ack.DeliveredTo, &wire.Failure{Node: id.Node, Local: id.Local})
		}
	}
	rep.Subscribers, rep.Groups = countsToWire(ans.counts), countsToWire(ans.groups)
	return rep
}

func countsToWire(counts map[string]int) map[string]uint32 {
	if counts == nil {
		return nil
	}
	out := make(map[string]uint32, len(counts))
	for k, v := range counts {
		out[k] = uint32(v)
	}
	return out
}

func countsFromWire(counts map[string]uint32) map[string]int {
	if counts == nil {
		return nil
	}
	out := make(map[string]int, len(counts))
	for k, v := range counts {
		out[k] = int(v)
	}
	return out
}

// answerFromWire decodes a remote owner's answer.
func answerFromWire(topic string, rep *wire.Reply) ownerAnswer {
	ans := ownerAnswer{code: rep.GetCode(), viewID: rep.GetViewId(), owner: rep.GetOwner(), reason: rep.GetError()}
	if rep.GetCode() == wire.Reply_OK {
		ans.ack = ackFromWire(topic, rep.GetAck())
		for _, f := range rep.GetAck().GetFailures() {
			if f.GetUnreported() {
				if ans.unreported == nil {
					ans.unreported = map[SubscriberID]bool{}
				}
				ans.unreported[SubscriberID{Node: f.GetNode(), Local: f.GetLocal()}] = true
			}
		}
		for _, f := range rep.GetAck().GetDeliveredTo() {
			ans.delivered = append(ans.delivered, SubscriberID{Node: f.GetNode(), Local: f.GetLocal()})
		}
	}
	ans.counts, ans.groups = countsFromWire(rep.GetSubscribers()), countsFromWire(rep.GetGroups())
	return ans
}

func ackToWire(a PublishAck) *wire.Ack {
	w := &wire.Ack{Status: uint32(a.Status), Reason: uint32(a.Reason), Messages: uint32(a.Messages), Delivered: uint32(a.Delivered)}
	for _, f := range a.Failures {
		local := f.Subscriber.Local
		if f.Subscriber == (SubscriberID{}) && f.Group != "" {
			local = groupMark + f.Group // a group with no live member
		}
		w.Failures = append(w.Failures, &wire.Failure{Node: f.Subscriber.Node, Local: local, Status: uint32(f.Status)})
	}
	return w
}

func ackFromWire(topic string, w *wire.Ack) PublishAck {
	a := PublishAck{Topic: topic, Status: AckStatus(w.GetStatus()), Reason: Reason(w.GetReason()),
		Messages: int(w.GetMessages()), Delivered: int(w.GetDelivered())}
	for _, f := range w.GetFailures() {
		st := DeliveryStatus(f.GetStatus())
		if f.GetStatus() > uint32(lastDeliveryStatus) {
			st = HandlerError // a newer owner's status this node cannot name
		}
		id := SubscriberID{Node: f.GetNode(), Local: f.GetLocal()}
		fl := DeliveryFailure{Subscriber: id, Status: st, Group: id.Group()}
		if id.Node == "" && strings.HasPrefix(id.Local, groupMark) {
			fl.Subscriber = SubscriberID{} // a group with no live member
		}
		a.Failures = append(a.Failures, fl)
	}
	return a
}
