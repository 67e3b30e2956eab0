package pubsub

import "sync"

// serial runs submitted work one item at a time, in submission order, on a
// goroutine that exists only while work is queued: an idle actor costs no
// goroutine. It is the execution model of every actor in this package
// (topicActor, mailbox); the state an actor owns is touched only from work
// run by its serial.
type serial struct {
	mu         sync.Mutex
	queue      []func()
	running    bool
	limit      int    // 0: unbounded
	goroutines *group // counted so Close can wait; may be nil
}

// do queues f. It reports false, without queueing, when limit items wait.
func (s *serial) do(f func()) bool { return s.doUpTo(f, s.limit) }

// doUpTo is do with another limit (0: unbounded), for work that must never
// be refused beside work that may be.
func (s *serial) doUpTo(f func(), limit int) bool {
	s.mu.Lock()
	if limit > 0 && len(s.queue) >= limit {
		s.mu.Unlock()
		return false
	}
	s.queue = append(s.queue, f)
	if s.running {
		s.mu.Unlock()
		return true
	}
	s.running = true
	if s.goroutines != nil {
		s.goroutines.add()
	}
	s.mu.Unlock()
	go s.run()
	return true
}

// take removes and returns the queued items, which then never run here.
func (s *serial) take() []func() {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queue
	s.queue = nil
	return q
}

// depth returns the number of queued items.
func (s *serial) depth() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

func (s *serial) run() {
	if s.goroutines != nil {
		defer s.goroutines.done()
	}
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			s.running = false
			// Let a burst's backing array go once the actor is idle.
			s.queue = nil
			s.mu.Unlock()
			return
		}
		f := s.queue[0]
		s.queue[0] = nil
		s.queue = s.queue[1:]
		s.mu.Unlock()
		f()
	}
}
