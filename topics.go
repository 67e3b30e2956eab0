package pubsub

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/clusterpubsub/pubsub/internal/wire"
)

// TopicInfo is one topic with live subscribers, as Node.Topics reports it.
type TopicInfo struct {
	Topic string
	// Owner is the topic's owner in the asking node's view: "" when no
	// member may own topics (every member is client-only).
	Owner string
	// Subscribers counts the topic's live subscriptions on every member
	// that answered, group members included.
	Subscribers int
	// Groups counts the members of each consumer group among them; nil
	// without groups.
	Groups map[string]int
	// GroupsTruncated: a member had so many groups on the topic that their
	// summary did not fit one NATS message, and Groups lists only some of
	// them (Subscribers still counts every subscription).
	GroupsTruncated bool
}

const (
	// maxTopicsAsked bounds the members Topics asks at once.
	maxTopicsAsked = 16
	// maxTopicsListed bounds the topics Topics takes from one member and
	// lists in all: a member answering page after page (a forger in the
	// view), or several, fail past it instead of growing the listing
	// without end.
	maxTopicsListed = 1 << 18
)

// Topics lists every topic with a live subscriber anywhere in the
// cluster, sorted by name. It asks every member of this node's view (this
// node included) for its subscriptions, summed per topic, in pages that
// fit the NATS server's max_payload, and names each topic's owner in this
// node's view.
//
// Each member has RequestTimeout per page, cut to ctx's deadline. When
// members fail to answer in full (they left, are unreachable, run a
// version without this request, or answer more than 262 144 topics, or
// would take the listing past 262 144),
// Topics returns what the others reported together with an error naming
// them, wrapping ErrTimeout, ErrClosed or (past the topics) ErrTooLarge:
// the counts then miss those members' subscriptions, none of which is
// counted.
func (n *Node) Topics(ctx context.Context) ([]TopicInfo, error) {
	if n.life.closed.Load() {
		return nil, fmt.Errorf("pubsub: topics: %w", ErrClosed)
	}
	v := n.view()
	var (
		mu     sync.Mutex
		byName = map[string]*TopicInfo{}
		errs   []error
		wg     sync.WaitGroup
		slots  = make(chan struct{}, maxTopicsAsked)
	)
	add := func(page []*wire.TopicSummary) error {
		mu.Lock()
		defer mu.Unlock()
		fresh := 0
		for _, ts := range page {
			if byName[ts.GetTopic()] == nil {
				fresh++
			}
		}
		if len(byName)+fresh > maxTopicsListed {
			return fmt.Errorf("%w: the listing would pass %d topics", ErrTooLarge, maxTopicsListed)
		}
		for _, ts := range page {
			ti := byName[ts.GetTopic()]
			if ti == nil {
				ti = &TopicInfo{Topic: ts.GetTopic()}
				byName[ti.Topic] = ti
			}
			ti.Subscribers += int(ts.GetSubscribers())
			ti.GroupsTruncated = ti.GroupsTruncated || ts.GetGroupsTruncated()
			for g, c := range ts.GetGroups() {
				if ti.Groups == nil {
					ti.Groups = map[string]int{}
				}
				ti.Groups[g] += int(c)
			}
		}
		return nil
	}
	for _, m := range v.members {
		wg.Go(func() {
			select {
			case slots <- struct{}{}:
				defer func() { <-slots }()
			case <-ctx.Done():
				mu.Lock()
				errs = append(errs, fmt.Errorf("member %s: %w", m.ID, ctx.Err()))
				mu.Unlock()
				return
			}
			if err := n.topicsOf(ctx, m, add); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("member %s: %w", m.ID, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	out := make([]TopicInfo, 0, len(byName))
	for _, ti := range byName {
		if ti.Subscribers == 0 {
			continue // a forged or confused page of empty topics
		}
		ti.Owner = v.ownerOf(ti.Topic).ID
		out = append(out, *ti)
	}
	slices.SortFunc(out, func(a, b TopicInfo) int { return cmp.Compare(a.Topic, b.Topic) })
	if len(errs) > 0 {
		slices.SortFunc(errs, func(a, b error) int { return cmp.Compare(a.Error(), b.Error()) })
		return out, fmt.Errorf("pubsub: topics: %d of %d members did not answer in full, none of their subscriptions is counted: %w", len(errs), len(v.members), errors.Join(errs...))
	}
	return out, nil
}

// topicsOf pages through member m's subscriptions and hands them to add
// once it has them all: a member failing halfway contributes nothing. This
// node answers itself without NATS.
func (n *Node) topicsOf(ctx context.Context, m Member, add func([]*wire.TopicSummary) error) error {
	after := ""
	var all []*wire.TopicSummary
	for {
		var rep *wire.Reply
		if m.ID == n.self.ID {
			rep = n.topicsPage(after)
		} else {
			env := &wire.Envelope{Body: &wire.Envelope_Topics{Topics: &wire.TopicsRequest{From: n.selfRef(), After: after}}}
			var err error
			rep, err = n.rpc.callEnvelope(ctx, m.Inbox, env, callOpts{timeout: n.cfg.RequestTimeout})
			switch {
			case errors.Is(err, errNoResponders):
				return fmt.Errorf("%w: no inbox subscription (the member left)", ErrTimeout)
			case err != nil:
				return err
			case rep.GetCode() == wire.Reply_CLOSED:
				return fmt.Errorf("%w: the member is closing", ErrClosed)
			case rep.GetCode() != wire.Reply_OK:
				return fmt.Errorf("%w: answered %s %q (a version without topic listings?)", ErrTimeout, rep.GetCode(), rep.GetError())
			}
		}
		page := rep.GetTopics()
		if len(all)+len(page) > maxTopicsListed {
			return fmt.Errorf("%w: more than %d topics", ErrTooLarge, maxTopicsListed)
		}
		all = append(all, page...)
		if !rep.GetMore() {
			return add(all)
		}
		// Pages are sorted: a page that does not move past after would
		// make this loop forever.
		if len(page) == 0 || page[len(page)-1].GetTopic() <= after {
			return fmt.Errorf("%w: a page that does not advance past %q", ErrTimeout, after)
		}
		after = page[len(page)-1].GetTopic()
	}
}

// onTopicsRequest answers a TopicsRequest with one page.
func (n *Node) onTopicsRequest(req *wire.TopicsRequest, reply string) {
	n.replyTo(reply, n.topicsPage(req.GetAfter()))
}

// topicsPage builds the page of this node's live subscriptions, summed per
// topic, of the topics sorted after after, as many as fit max_payload.
func (n *Node) topicsPage(after string) *wire.Reply {
	byTopic := map[string]*wire.TopicSummary{}
	n.subscriber.each(func(_ string, s *Subscription) {
		if s.isDone() || s.topic <= after {
			return
		}
		ts := byTopic[s.topic]
		if ts == nil {
			ts = &wire.TopicSummary{Topic: s.topic}
			byTopic[s.topic] = ts
		}
		ts.Subscribers++
		if g := s.id.Group(); g != "" {
			if ts.Groups == nil {
				ts.Groups = map[string]uint32{}
			}
			ts.Groups[g]++
		}
	})
	topics := slices.Sorted(maps.Keys(byTopic))
	// Room for the envelope and the reply's other fields.
	budget := n.maxPayload() - 256
	rep := &wire.Reply{Code: wire.Reply_OK}
	for i, t := range topics {
		ts := byTopic[t]
		size := proto.Size(ts) + 8 // the field's tag and length
		if size > budget && i == 0 {
			size = n.truncateGroups(ts, budget)
		}
		if budget -= size; budget < 0 {
			rep.More = true
			break
		}
		rep.Topics = append(rep.Topics, ts)
	}
	return rep
}

// truncateGroups cuts ts's groups, kept in name order, until ts fits
// budget bytes, so that a page always holds at least one topic (and the
// asker's paging advances), and returns ts's size.
func (n *Node) truncateGroups(ts *wire.TopicSummary, budget int) int {
	names := slices.Sorted(maps.Keys(ts.Groups))
	kept := map[string]uint32{}
	size := proto.Size(&wire.TopicSummary{Topic: ts.Topic, Subscribers: ts.Subscribers, GroupsTruncated: true}) + 8
	for _, g := range names {
		entry := len(g) + 16 // the map entry's key, value, tags and lengths
		if size+entry > budget {
			break
		}
		kept[g] = ts.Groups[g]
		size += entry
	}
	if ok, held := n.log.limit.allow("topics/truncated"); ok {
		n.log.Warn("topic listing: a topic's consumer groups do not fit one NATS message; listing some",
			"topic", ts.Topic, "groups", len(ts.Groups), "listed", len(kept), "suppressed", held)
	}
	ts.Groups, ts.GroupsTruncated = kept, true
	return proto.Size(ts) + 8
}
