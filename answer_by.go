package pubsub

import (
	"cmp"
	"slices"
	"time"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// Answering before the publisher stops waiting. A publisher tells the
// owner how long it waits for an AckDelivered answer (answer_within_ms:
// its call's deadline or its own node's SubscriberTimeout +
// RequestTimeout, whichever ends first). The owner would otherwise wait
// for the subscriber nodes' reports by its own timeouts, up to
// SubscriberTimeout + RequestTimeout/2. When the publisher's wait ends
// first (a Publish whose ctx has a shorter deadline, a producer with a
// short PublishTimeout, a publishing node configured with shorter timeouts
// than the owner's), the owner answers just before it ends with what it
// knows: the reports so far, and each subscriber not yet reported as
// Timeout (outcome unknown: its delivery goes on). The batch's final
// outcome still goes to events, eviction and at-least-once retries.
// Before, such a publisher got ErrTimeout (or its ctx's error) and learnt
// nothing of the subscribers that had run the batch.

// maxAnswerMargin bounds how long before the publisher's deadline the
// owner answers (a quarter of what is left of the publisher's wait, at
// most a quarter of the owner's RequestTimeout): the answer's way back.
// An eighth left 125 ms for a 1 s deadline, and under the load of the
// whole suite an answer once took longer to come back
// (TestGroupMemberFailingTwoSharesIsListedOnce).
// Bounded by RequestTimeout/4, it never arms for a publisher with the
// owner's own timeouts and no shorter deadline: that one waits
// SubscriberTimeout + RequestTimeout, the owner at most
// SubscriberTimeout + RequestTimeout/2.
const maxAnswerMargin = 250 * time.Millisecond

// earlyAnswer is what a batch keeps to answer before its publisher's
// deadline. Guarded by the batch's mu.
type earlyAnswer struct {
	timer   *time.Timer
	waiting waitingSubscribers
	sent    bool // the publisher has its answer
}

// armEarlyAnswer makes b answer its publisher just before msgs.answerBy
// when that comes before the owner would answer anyway. It runs before
// any of the batch's deliveries is sent.
func (a *topicActor) armEarlyAnswer(b *pendingBatch, msgs payload, targets []nodeTarget) {
	if msgs.level != AckDelivered || msgs.answerBy.IsZero() {
		return
	}
	now := time.Now()
	at := msgs.answerBy.Add(-min(msgs.answerBy.Sub(now)/4, a.n.cfg.RequestTimeout/4, maxAnswerMargin))
	if !at.Before(now.Add(a.n.cfg.SubscriberTimeout + a.n.cfg.RequestTimeout/2)) {
		return // every node has reported or timed out by then
	}
	e := &earlyAnswer{waiting: waitingSubscribers{}}
	for _, t := range targets {
		e.waiting.add(t)
	}
	b.mu.Lock()
	b.early = e
	e.timer = time.AfterFunc(max(time.Until(at), 0), b.answerEarly)
	b.mu.Unlock()
}

// add counts the deliveries of one node's part of a batch.
func (w waitingSubscribers) add(t nodeTarget) {
	for i := range t.len() {
		w[SubscriberID{Node: t.node, Local: t.local(i)}]++
	}
}

// waitingSubscribers counts a batch's deliveries not yet reported.
type waitingSubscribers map[SubscriberID]int

// reported counts one delivery to id as reported.
func (w waitingSubscribers) reported(id SubscriberID) {
	if w[id]--; w[id] <= 0 {
		delete(w, id)
	}
}

// answerEarly answers the publisher with the batch's outcome so far, each
// subscriber still waited for listed as Timeout. A batch already answered,
// or settled meanwhile, is left alone.
func (b *pendingBatch) answerEarly() {
	b.mu.Lock()
	e := b.early
	if e.sent || b.remaining == 0 {
		b.mu.Unlock()
		return
	}
	e.sent = true
	ack := b.ack
	ack.Failures = slices.Clone(b.ack.Failures)
	var delivered []SubscriberID
	if b.wantIDs {
		delivered = slices.Clone(b.delivered)
	}
	waiting := make([]SubscriberID, 0, len(e.waiting))
	for id := range e.waiting {
		waiting = append(waiting, id)
	}
	slices.SortFunc(waiting, func(x, y SubscriberID) int {
		return cmp.Or(cmp.Compare(x.Node, y.Node), cmp.Compare(x.Local, y.Local))
	})
	unsettled := map[string]bool{} // groups with a share still out
	unreported := make(map[SubscriberID]bool, len(waiting))
	for _, id := range waiting {
		g := id.Group()
		if b.failedMembers[id] {
			unsettled[g] = true // listed once, with the status it reported
			continue
		}
		ack.Failures = append(ack.Failures, DeliveryFailure{Subscriber: id, Status: Timeout, Group: g})
		unreported[id] = true
		if g != "" {
			unsettled[g] = true
		}
	}
	for g, ok := range b.groups {
		if ok && !unsettled[g] {
			ack.Delivered++
			if b.wantIDs {
				delivered = append(delivered, SubscriberID{Local: groupMark + g})
			}
		}
	}
	b.mu.Unlock()
	n := b.a.n
	n.stats.answeredEarly.Add(1)
	n.log.Debug("batch answered at its publisher's deadline", "topic", b.a.topic, "waiting", len(waiting))
	b.answer(ownerAnswer{code: wire.Reply_OK, viewID: n.view().id, ack: ack, delivered: delivered, unreported: unreported})
}
