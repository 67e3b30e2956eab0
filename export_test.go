package pubsub

import (
	"slices"
	"sync"
	"testing"
)

// ViewIDForTest returns the ID of the view of members, as heartbeats carry
// it: tests forging stable views need it.
func ViewIDForTest(members []Member) uint64 { return newView(0, slices.Clone(members)).id }

// StableConfirmedForTest reports whether the node's last stable-view change
// is confirmed (KeepMajority).
func (n *Node) StableConfirmedForTest() bool {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	return n.members.quorum.confirmed
}

// StableIDsForTest returns the IDs of the node's stable view, sorted
// (KeepMajority).
func (n *Node) StableIDsForTest() []string {
	n.members.mu.Lock()
	defer n.members.mu.Unlock()
	q := &n.members.quorum
	if q.stable == nil {
		return nil
	}
	ids := make([]string, 0, len(q.stable.members))
	for _, m := range q.stable.members {
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	return ids
}

// OwnerForTest returns the ID of topic's owner in a view of the members
// with these IDs (all of them may own), as view.ownerOf picks it: tests
// choose topics a joiner will take over.
func OwnerForTest(topic string, ids []string) string {
	members := make([]Member, len(ids))
	for i, id := range ids {
		members[i] = Member{ID: id}
	}
	return newView(0, members).ownerOf(topic).ID
}

// WithSilentWaitForTest makes a node publish as one of an older version of
// this package did, without telling the owner how long it waits: a slow
// subscriber then times its attempts out instead of being listed in an
// answer at its deadline, which tests of retries after an unknown outcome
// need.
func WithSilentWaitForTest() Option { return func(c *Config) { c.silentWait = true } }

// WithPushHookForTest makes the node call f(false) when it has built the
// pushed syncs of a view change and not written them yet, and f(true) once
// it wrote them.
func WithPushHookForTest(f func(written bool)) Option {
	return func(c *Config) { c.pushHook = f }
}

// SetProducerMarksLimitForTest sets the node's budget of producer marks
// (maxNodeProducerMarks), for tests that reach it fast.
func (n *Node) SetProducerMarksLimitForTest(limit int64) { n.marks.limit.Store(limit) }

// LimitSubscriptionsForTest lowers the subscriptions the node may hold
// (maxSubscriptions), which also bounds what it pulls from one member.
func (n *Node) LimitSubscriptionsForTest(limit int) {
	n.subscriber.mu.Lock()
	defer n.subscriber.mu.Unlock()
	n.subscriber.max = limit
}

// LimitOwnerRecordsForTest lowers the subscriber records the node holds
// as owner (maxOwnerRecords).
func (n *Node) LimitOwnerRecordsForTest(limit int64) { n.owner.maxRecords.Store(limit) }

// OwnerRecordsForTest returns the subscriber records the node holds as
// owner, over all its topics.
func (n *Node) OwnerRecordsForTest() int64 { return n.owner.records.Load() }

// LimitKeptCopiesForTest bounds the bytes of the node's kept copies
// (kept.go): a bound below any batch keeps none, as when copies were
// dropped past the bound.
func (n *Node) LimitKeptCopiesForTest(bytes int) {
	n.publisher.kept.mu.Lock()
	defer n.publisher.kept.mu.Unlock()
	n.publisher.kept.maxBytes = bytes
}

// ExpireKeptCopiesForTest makes the node's kept copies expire at once: a
// delivery naming one finds none, as when it came past the copy's time.
func (n *Node) ExpireKeptCopiesForTest() {
	n.publisher.kept.mu.Lock()
	defer n.publisher.kept.mu.Unlock()
	n.publisher.kept.ttl = 0
}

// KeptCopiesForTest returns the number of copies the node keeps and their
// bytes.
func (n *Node) KeptCopiesForTest() (copies, bytes int) { return n.publisher.kept.held() }

// SetOwnerInflightBudgetForTest lowers the bytes of accepted, unsettled
// batches the node holds as owner before it refuses publishes.
func (n *Node) SetOwnerInflightBudgetForTest(bytes int64) { n.owner.budget.Store(bytes) }

// StallActorForTest makes the node's actor of topic wait until release is
// called (or the test ends): requests to it queue meanwhile.
func (n *Node) StallActorForTest(t testing.TB, topic string) (release func()) {
	running, stop := make(chan struct{}), make(chan struct{})
	if !n.owner.onActor(topic, false, func(*topicActor) { close(running); <-stop }) {
		t.Fatalf("the actor of %q took no request", topic)
	}
	<-running
	var once sync.Once
	release = func() { once.Do(func() { close(stop) }) }
	t.Cleanup(release)
	return release
}
