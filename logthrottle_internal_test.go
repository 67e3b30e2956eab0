package pubsub

import (
	"testing"
	"time"
)

func TestLogThrottleOneLinePerIntervalWithCount(t *testing.T) {
	lt := logThrottle{interval: time.Hour}
	if ok, held := lt.allow("sub-1"); !ok || held != 0 {
		t.Fatalf("first line held back: %v %d", ok, held)
	}
	for i := 0; i < 5; i++ {
		if ok, _ := lt.allow("sub-1"); ok {
			t.Fatal("a repeated line within the interval was let through")
		}
	}
	if ok, _ := lt.allow("sub-2"); !ok {
		t.Fatal("another key was held back")
	}
	lt.keys["sub-1"].at = time.Now().Add(-2 * time.Hour) // the interval has passed
	if ok, held := lt.allow("sub-1"); !ok || held != 5 {
		t.Fatalf("after the interval: %v, %d held; want true, 5", ok, held)
	}
	lt.keys["sub-2"].at = time.Now().Add(-3 * time.Hour)
	lt.sweep()
	if _, kept := lt.keys["sub-2"]; kept {
		t.Fatal("sweep kept a key quiet for two intervals")
	}
}
