// Package faultnet is a TCP proxy for loopback tests that can break the
// connections it carries on demand: cut them (every connection closed, new
// ones refused) or stall them in one direction (bytes held, not dropped, as
// on a half-open TCP connection whose peer stopped reading).
//
// A Link listens on 127.0.0.1 and forwards each accepted connection to a
// fixed target. Each proxied connection is pumped by two goroutines, one per
// direction. A stalled pump stops reading from its source, so the kernel
// buffers fill and the sender sees TCP backpressure, exactly what a peer
// that stopped reading would cause; at most one read buffer of bytes sits in
// the pump itself. Heal resumes the pumps and the held bytes are delivered in
// order.
package faultnet

import (
	"errors"
	"net"
	"sync"
	"time"
)

// Direction selects which way bytes flow through a Link. The client is the
// side that dialed Link.Addr; the target is the address given to Listen.
type Direction uint8

const (
	// Forward is client→target: bytes the dialer sends.
	Forward Direction = 1 << iota
	// Backward is target→client: bytes the target sends back.
	Backward
	// Both is Forward and Backward together.
	Both = Forward | Backward
)

// String returns "forward", "backward", "both" or "none".
func (d Direction) String() string {
	switch d & Both {
	case Forward:
		return "forward"
	case Backward:
		return "backward"
	case Both:
		return "both"
	}
	return "none"
}

const (
	// dialTimeout bounds the dial to the target. Loopback dials succeed or
	// are refused at once; the bound only matters for a target that hangs.
	dialTimeout = 5 * time.Second

	// bufSize is each pump's read buffer: the most a stalled pump can hold
	// in user space beyond what the kernel buffers.
	bufSize = 32 << 10
)

// Link is a fault-injecting TCP proxy to one target. Its methods are safe
// for concurrent use.
type Link struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup // accept loop, connection handlers and pumps

	mu      sync.Mutex
	changed *sync.Cond // broadcast on any change of stalled, cut, closed or a pair's closed
	stalled Direction
	cut     bool
	closed  bool
	pairs   map[*pair]struct{}
}

// pair is one proxied connection: the accepted client side and the dialed
// target side.
type pair struct {
	client, target net.Conn
	closed         bool // guarded by Link.mu
}

// Listen starts a proxy on a random port of 127.0.0.1 that forwards every
// accepted connection to target (host:port). Close it when done.
func Listen(target string) (*Link, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	l := &Link{target: target, ln: ln, pairs: make(map[*pair]struct{})}
	l.changed = sync.NewCond(&l.mu)
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

// Addr returns the host:port clients dial to go through the link.
func (l *Link) Addr() string { return l.ln.Addr().String() }

// Target returns the address the link forwards to.
func (l *Link) Target() string { return l.target }

// Cut closes every current connection and makes the link accept and
// immediately close new ones until Heal, like a network partition that
// resets connections (the peers see EOF or a reset, not a hang).
func (l *Link) Cut() {
	l.mu.Lock()
	l.cut = true
	pairs := l.takePairsLocked()
	l.mu.Unlock()
	for _, p := range pairs {
		p.closeConns()
	}
}

// Stall holds the bytes flowing in direction dir, on current and future
// connections, until Heal. Stalls accumulate: Stall(Forward) then
// Stall(Backward) stalls both ways. Bytes read by a pump after Stall
// returns are held; a write already in progress when Stall is called
// completes.
func (l *Link) Stall(dir Direction) {
	l.mu.Lock()
	l.stalled |= dir & Both
	l.changed.Broadcast()
	l.mu.Unlock()
}

// Stalled returns the directions currently stalled.
func (l *Link) Stalled() Direction {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stalled
}

// Heal undoes Cut and Stall: new connections are forwarded again and
// stalled pumps deliver what they hold, in order, then resume. Connections
// closed by Cut stay closed; their peers must reconnect.
func (l *Link) Heal() {
	l.mu.Lock()
	l.stalled = 0
	l.cut = false
	l.changed.Broadcast()
	l.mu.Unlock()
}

// NumConns returns the number of proxied connections currently open.
func (l *Link) NumConns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.pairs)
}

// Close stops listening, closes every connection and waits until every
// goroutine the link started has returned. It is idempotent.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.wg.Wait()
		return nil
	}
	l.closed = true
	pairs := l.takePairsLocked()
	l.changed.Broadcast()
	l.mu.Unlock()
	err := l.ln.Close()
	for _, p := range pairs {
		p.closeConns()
	}
	l.wg.Wait()
	return err
}

// takePairsLocked removes every pair from the link, marks it closed, wakes
// its stalled pumps and returns the pairs for their connections to be closed
// outside the lock.
func (l *Link) takePairsLocked() []*pair {
	pairs := make([]*pair, 0, len(l.pairs))
	for p := range l.pairs {
		p.closed = true
		pairs = append(pairs, p)
	}
	clear(l.pairs)
	l.changed.Broadcast()
	return pairs
}

func (l *Link) acceptLoop() {
	defer l.wg.Done()
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary failures (e.g. too many open files): back off
			// briefly rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		l.mu.Lock()
		refuse := l.cut || l.closed
		if !refuse {
			// Added under the lock that Close takes, so Close either sees
			// closed set first or waits for this handler.
			l.wg.Add(1)
		}
		l.mu.Unlock()
		if refuse {
			conn.Close()
			continue
		}
		go l.handle(conn)
	}
}

// handle dials the target for one accepted connection and pumps bytes both
// ways until either side fails or the link cuts or closes the pair.
func (l *Link) handle(client net.Conn) {
	defer l.wg.Done()
	target, err := net.DialTimeout("tcp", l.target, dialTimeout)
	if err != nil {
		// The target is down: the client sees its connection close, as it
		// would when dialing the target directly.
		client.Close()
		return
	}
	p := &pair{client: client, target: target}
	l.mu.Lock()
	if l.cut || l.closed {
		l.mu.Unlock()
		p.closeConns()
		return
	}
	l.pairs[p] = struct{}{}
	l.wg.Add(1)
	l.mu.Unlock()
	go func() {
		defer l.wg.Done()
		l.pump(p, Backward, target, client)
	}()
	l.pump(p, Forward, client, target)
}

// pump copies src to dst for direction dir, holding bytes while dir is
// stalled. On any error it closes the whole pair: the proxy does not model
// TCP half-close, which NATS does not use.
func (l *Link) pump(p *pair, dir Direction, src, dst net.Conn) {
	defer l.drop(p)
	buf := make([]byte, bufSize)
	for {
		// Not reading while stalled is what builds backpressure.
		if !l.waitFlowing(p, dir) {
			return
		}
		n, err := src.Read(buf)
		if n > 0 {
			// The stall may have started while Read was blocked: hold the
			// bytes just read rather than forward them.
			if !l.waitFlowing(p, dir) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// waitFlowing blocks while dir is stalled and reports whether the pair is
// still open.
func (l *Link) waitFlowing(p *pair, dir Direction) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.stalled&dir != 0 && !p.closed && !l.closed {
		l.changed.Wait()
	}
	return !p.closed && !l.closed
}

// drop removes p from the link and closes both its connections, which also
// ends the other pump's blocked Read or Write.
func (l *Link) drop(p *pair) {
	l.mu.Lock()
	if !p.closed {
		p.closed = true
		delete(l.pairs, p)
		l.changed.Broadcast()
	}
	l.mu.Unlock()
	p.closeConns()
}

// closeConns closes both sides; closing twice is harmless for net.Conn.
func (p *pair) closeConns() {
	p.client.Close()
	p.target.Close()
}
