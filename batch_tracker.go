package pubsub

import (
	"context"
	"sync"
)

// batchTracker: the statuses of one batch's subscribers on one node,
// collected from their mailboxes until every one reported or the
// subscriber timeout passed.

// statusPending marks a subscriber that has not reported yet.
const statusPending DeliveryStatus = 0xff

// batchTracker collects the statuses of one batch on one node.
type batchTracker struct {
	mu        sync.Mutex
	statuses  []DeliveryStatus
	processed []uint32 // nil until a subscription ends partway through (setPartial)
	behind    []uint32 // subscribers that dropped the batch by its owner's number (setBehind)
	remaining int
	done      func(st []DeliveryStatus, processed, behind []uint32)
	cancel    context.CancelFunc
	stop      func() bool // unregisters expire
}

func (t *batchTracker) set(i int, s DeliveryStatus) {
	t.mu.Lock()
	if t.remaining == 0 || t.statuses[i] != statusPending {
		t.mu.Unlock()
		return
	}
	t.statuses[i] = s
	t.remaining--
	finished := t.remaining == 0
	t.mu.Unlock()
	if finished {
		t.finish()
	}
}

// status returns subscriber i's reported status (statusPending before).
func (t *batchTracker) status(i int) DeliveryStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.statuses[i]
}

// setPartial reports subscriber i's status with the number of its
// messages it processed before its subscription ended.
func (t *batchTracker) setPartial(i int, s DeliveryStatus, processed int) {
	t.mu.Lock()
	if t.remaining > 0 && t.statuses[i] == statusPending {
		if t.processed == nil {
			t.processed = make([]uint32, len(t.statuses))
		}
		t.processed[i] = uint32(processed)
	}
	t.mu.Unlock()
	t.set(i, s)
}

// setBehind reports subscriber i as OutOfOrder because it had seen a later
// batch number of the batch's owner incarnation.
func (t *batchTracker) setBehind(i int) {
	t.mu.Lock()
	if t.remaining > 0 && t.statuses[i] == statusPending {
		t.behind = append(t.behind, uint32(i))
	}
	t.mu.Unlock()
	t.set(i, OutOfOrder)
}

// expire reports every subscriber still pending as Timeout.
func (t *batchTracker) expire() {
	t.mu.Lock()
	if t.remaining == 0 {
		t.mu.Unlock()
		return
	}
	for i, s := range t.statuses {
		if s == statusPending {
			t.statuses[i] = Timeout
		}
	}
	t.remaining = 0
	t.mu.Unlock()
	t.finish()
}

func (t *batchTracker) finish() {
	t.mu.Lock()
	stop, cancel := t.stop, t.cancel
	t.mu.Unlock()
	if cancel != nil {
		stop()
		cancel()
	}
	t.done(t.statuses, t.processed, t.behind)
}
