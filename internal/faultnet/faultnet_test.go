package faultnet_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/clusterpubsub/pubsub/internal/faultnet"
)

const (
	// timeout bounds every wait for something that must happen.
	timeout = 5 * time.Second
	// quiet is how long a negative check ("nothing arrives") watches. It
	// cannot prove absence, only make a leak through the stall very likely
	// to show.
	quiet = 100 * time.Millisecond
)

// server is a target that hands each accepted connection to the test, so
// the test can play both ends of a proxied connection.
type server struct {
	ln    net.Listener
	conns chan net.Conn
	wg    sync.WaitGroup
}

func startServer(t *testing.T) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln, conns: make(chan net.Conn, 16)}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns <- c
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
		close(s.conns)
		for c := range s.conns {
			c.Close()
		}
	})
	return s
}

// accept returns the server side of the next proxied connection.
func (s *server) accept(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(timeout):
		t.Fatal("target: no connection accepted")
		return nil
	}
}

// startEcho starts a target that echoes every byte back.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func listen(t *testing.T, target string) *faultnet.Link {
	t.Helper()
	l, err := faultnet.Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func write(t *testing.T, c net.Conn, s string) {
	t.Helper()
	c.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatalf("write %q: %v", s, err)
	}
}

// expect reads exactly len(want) bytes and checks them.
func expect(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(timeout))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read %q: got %q, %v", want, got, err)
	}
	if string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// expectNothing checks that nothing arrives on c for a while.
func expectNothing(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(quiet))
	buf := make([]byte, 1)
	n, err := c.Read(buf)
	if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read through a stall: %q, %v", buf[:n], err)
	}
}

// expectClosed checks that the peer closes c: the read ends with an error
// other than a timeout.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err == nil {
		t.Fatalf("read %q on a connection that should be closed", buf[:n])
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection not closed")
	}
}

func TestDataFlows(t *testing.T) {
	l := listen(t, startEcho(t))
	c := dial(t, l.Addr())
	for _, msg := range []string{"hello", "world", string(bytes.Repeat([]byte("x"), 100_000))} {
		write(t, c, msg)
		expect(t, c, msg)
	}
	if got := l.NumConns(); got != 1 {
		t.Errorf("NumConns = %d, want 1", got)
	}
}

// TestStallOneDirection stalls one direction and checks that the other
// still flows, then that Heal delivers the held bytes, in order, before
// later ones.
func TestStallOneDirection(t *testing.T) {
	for _, dir := range []faultnet.Direction{faultnet.Forward, faultnet.Backward} {
		t.Run(dir.String(), func(t *testing.T) {
			s := startServer(t)
			l := listen(t, s.ln.Addr().String())
			client := dial(t, l.Addr())
			target := s.accept(t)
			// from sends in the stalled direction, to receives.
			from, to := client, target
			if dir == faultnet.Backward {
				from, to = target, client
			}
			write(t, from, "before;")
			expect(t, to, "before;")

			l.Stall(dir)
			if got := l.Stalled(); got != dir {
				t.Fatalf("Stalled = %v, want %v", got, dir)
			}
			write(t, from, "held1;")
			write(t, from, "held2;")
			// The other direction still flows, both ways of reading it.
			write(t, to, "reverse;")
			expect(t, from, "reverse;")
			expectNothing(t, to)

			l.Heal()
			write(t, from, "after;")
			expect(t, to, "held1;held2;after;")
		})
	}
}

// TestStallBackpressure checks that a stall holds bytes rather than buffer
// them without bound: the sender blocks once the socket buffers are full,
// and after Heal every byte arrives in order.
func TestStallBackpressure(t *testing.T) {
	s := startServer(t)
	l := listen(t, s.ln.Addr().String())
	client := dial(t, l.Addr())
	target := s.accept(t)

	const total = 64 << 20 // far beyond loopback socket buffers
	data := make([]byte, total)
	for i := range data {
		data[i] = byte(i % 251) // a prime period, so shifted or lost bytes show
	}
	l.Stall(faultnet.Forward)
	client.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
	n, err := client.Write(data)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write of %d bytes through a stall: n=%d, err=%v; want a timeout", total, n, err)
	}
	t.Logf("%d bytes accepted before backpressure", n)

	l.Heal()
	done := make(chan error, 1)
	go func() {
		client.SetWriteDeadline(time.Now().Add(timeout))
		_, err := client.Write(data[n:])
		done <- err
	}()
	got := make([]byte, total)
	target.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(target, got); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		i := 0
		for got[i] == data[i] {
			i++
		}
		t.Fatalf("bytes differ from offset %d", i)
	}
}

func TestStallBoth(t *testing.T) {
	l := listen(t, startEcho(t))
	c := dial(t, l.Addr())
	write(t, c, "a")
	expect(t, c, "a")
	l.Stall(faultnet.Forward)
	l.Stall(faultnet.Backward)
	if got := l.Stalled(); got != faultnet.Both {
		t.Fatalf("Stalled = %v, want both", got)
	}
	write(t, c, "b")
	expectNothing(t, c)
	l.Heal()
	expect(t, c, "b")
}

// TestStallAppliesToNewConnections: a stall is a property of the link, not
// only of the connections open when it started.
func TestStallAppliesToNewConnections(t *testing.T) {
	l := listen(t, startEcho(t))
	l.Stall(faultnet.Backward)
	c := dial(t, l.Addr())
	write(t, c, "x")
	expectNothing(t, c)
	l.Heal()
	expect(t, c, "x")
}

func TestCut(t *testing.T) {
	l := listen(t, startEcho(t))
	c := dial(t, l.Addr())
	write(t, c, "a")
	expect(t, c, "a")

	l.Cut()
	expectClosed(t, c)
	if got := l.NumConns(); got != 0 {
		t.Errorf("NumConns after Cut = %d, want 0", got)
	}
	// Refused: accepted, then closed at once.
	expectClosed(t, dial(t, l.Addr()))

	l.Heal()
	c2 := dial(t, l.Addr())
	write(t, c2, "b")
	expect(t, c2, "b")
}

// TestCutWhileStalled: a cut closes stalled connections too, and the held
// bytes are dropped with them.
func TestCutWhileStalled(t *testing.T) {
	l := listen(t, startEcho(t))
	c := dial(t, l.Addr())
	l.Stall(faultnet.Both)
	write(t, c, "held")
	l.Cut()
	expectClosed(t, c)
	l.Heal()
	c2 := dial(t, l.Addr())
	write(t, c2, "fresh")
	expect(t, c2, "fresh")
}

// TestTargetDown: with nothing listening at the target, a client's
// connection is closed, as a refused dial would be.
func TestTargetDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	l := listen(t, addr)
	expectClosed(t, dial(t, l.Addr()))
}

// TestCloseReleasesStalledPumps: Close returns although pumps are stalled
// and connections open (goleak in TestMain checks nothing is left), and it
// is idempotent.
func TestCloseReleasesStalledPumps(t *testing.T) {
	l, err := faultnet.Listen(startEcho(t))
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, l.Addr())
	write(t, c, "a")
	expect(t, c, "a")
	l.Stall(faultnet.Both)
	write(t, c, "b")
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c)
	if _, err := net.DialTimeout("tcp", l.Addr(), timeout); err == nil {
		t.Error("dial after Close succeeded")
	}
}
