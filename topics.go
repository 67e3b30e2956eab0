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
}

// maxTopicsAsked bounds the members Topics asks at once.
const maxTopicsAsked = 16

// Topics lists every topic with a live subscriber anywhere in the
// cluster, sorted by name. It asks every member of this node's view (this
// node included) for its subscriptions, summed per topic, in pages that
// fit the NATS server's max_payload, and names each topic's owner in this
// node's view.
//
// Each member has RequestTimeout per page, cut to ctx's deadline. When
// members fail to answer (they left, are unreachable, or run a version
// without this request), Topics returns what the others reported together
// with an error naming them, wrapping ErrTimeout or ErrClosed; the counts
// then miss their subscriptions.
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
	add := func(page []*wire.TopicSummary) {
		mu.Lock()
		defer mu.Unlock()
		for _, ts := range page {
			ti := byName[ts.GetTopic()]
			if ti == nil {
				ti = &TopicInfo{Topic: ts.GetTopic()}
				byName[ti.Topic] = ti
			}
			ti.Subscribers += int(ts.GetSubscribers())
			for g, c := range ts.GetGroups() {
				if ti.Groups == nil {
					ti.Groups = map[string]int{}
				}
				ti.Groups[g] += int(c)
			}
		}
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
		return out, fmt.Errorf("pubsub: topics: %d of %d members did not answer, their subscriptions are not counted: %w", len(errs), len(v.members), errors.Join(errs...))
	}
	return out, nil
}

// topicsOf pages through member m's subscriptions, handing each page to
// add. This node answers itself without NATS.
func (n *Node) topicsOf(ctx context.Context, m Member, add func([]*wire.TopicSummary)) error {
	after := ""
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
		add(page)
		if !rep.GetMore() {
			return nil
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
		size := proto.Size(ts) + 4 // the field's tag and length
		if budget -= size; budget < 0 && i > 0 {
			rep.More = true
			break
		}
		rep.Topics = append(rep.Topics, ts)
	}
	return rep
}
