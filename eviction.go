package pubsub

import "time"

// Eviction on the owner: a topic actor applies each batch's outcomes to its
// subscribers' runs of failures (account) and evicts one that keeps
// failing, is gone, or has a forged order mark.

// failStreak is a subscriber's run of failed batches with no success.
type failStreak struct {
	n     int
	since time.Time // the first failure of the run
}

// account applies a batch's outcomes: a success (DecodeError included)
// resets a subscriber's failure count; SubscriberGone evicts at once; other
// failures the node reported evict after EvictAfter in a row. MailboxFull
// evicts only once the run has also lasted SubscriberTimeout: a burst that
// overflows a healthy subscriber's mailbox (a stalled route's backlog
// released at the heal, all at once) passes, a subscriber that stays behind
// does not.
func (a *topicActor) account(outcomes []subscriberOutcome) {
	var struck map[SubscriberID]bool // one strike per subscriber per batch
	for _, o := range outcomes {
		if o.status == Delivered || o.status == DecodeError {
			// DecodeError: the handler ran every message of the batch its
			// codec could read without an error (one that failed would
			// make it HandlerError), so the subscriber works: a batch
			// with a publisher's garbage must not bridge two failed ones
			// into "EvictAfter in a row".
			delete(a.fails, o.id)
			continue
		}
		if o.markAhead {
			// Its mark is ahead of every batch this owner numbered: a
			// forged delivery set it, and the subscription would drop
			// every later one unknowing. Ended, and told why, at once.
			if ok, held := a.n.log.limit.allow("evict/markahead"); ok {
				a.n.log.Warn("subscriber dropped a batch nothing could have overtaken as out of order: its order mark is ahead of this owner's batches (a forged delivery on its node's inbox?); evicting it",
					"topic", a.topic, "subscriber", o.id.String(), "suppressed", held)
			}
		} else if o.status == OutOfOrder || o.path {
			continue // the batch's, the publisher's or the network's fault, not the subscriber's
		}
		if ns := a.nodes[o.id.Node]; ns == nil {
			continue // already removed
		} else if _, ok := ns.set[o.id.Local]; !ok {
			continue
		}
		if o.status != SubscriberGone && !o.markAhead {
			if struck[o.id] {
				continue // a group member's own share and a re-routed one both failed
			}
			if struck == nil {
				struck = make(map[SubscriberID]bool)
			}
			struck[o.id] = true
			if a.fails == nil {
				a.fails = make(map[SubscriberID]failStreak)
			}
			run := a.fails[o.id]
			if run.n == 0 {
				run.since = time.Now()
			}
			run.n++
			a.fails[o.id] = run
			if run.n < a.n.cfg.EvictAfter || o.status == MailboxFull && time.Since(run.since) < a.n.cfg.SubscriberTimeout {
				continue
			}
		}
		if ns := a.nodes[o.id.Node]; ns != nil && a.remove(o.id, false) {
			a.noteDirect(o.id, ns.inc, false) // an older answer must not bring it back
		}
		if o.status == SubscriberGone {
			// Its node no longer has it, or is closing: nothing to tell.
			// (One whose node left the view is not evicted here, see
			// remoteStatuses.)
			a.n.stats.evicted.Add(1)
			emit(a.n.events, SubscriberEvicted{Topic: a.topic, Subscriber: o.id, Group: o.id.Group(), Status: o.status})
			continue
		}
		a.n.notifyEvicted(a.topic, o.id, o.status)
		if o.id.Node != a.n.self.ID { // a local subscriber's eviction is emitted once, by evictLocal
			emit(a.n.events, SubscriberEvicted{Topic: a.topic, Subscriber: o.id, Group: o.id.Group(), Status: o.status})
		}
	}
}
