package pubsub

import (
	"context"
	"errors"
	"testing"
)

// A batch whose first attempt had an unknown outcome (ReasonTimeout: it may
// have been delivered) and whose retry was then refused outright must not
// complete as "not published": the first attempt may have run on every
// subscriber. Seen on a leaving node: its producer's in-flight batch ended
// with the node's Close (ErrTimeout, outcome unknown, delivered in fact),
// the retry met the closed node (ErrClosed), and the futures reported
// ReasonClosed for messages every subscriber had run.
func TestProducerRetryRefusedAfterAnUnknownOutcomeStaysUnknown(t *testing.T) {
	for _, tc := range []struct {
		name     string
		second   error
		decision func(attempt int) ErrorDecision
	}{
		{"closed", ErrClosed, func(int) ErrorDecision { return RetryBatch(0) }},
		{"unavailable then continue", ErrTopicUnavailable, func(a int) ErrorDecision {
			if a < 2 {
				return RetryBatch(0)
			}
			return FailBatchAndContinue
		}},
		{"unavailable then stop", ErrTopicUnavailable, func(a int) ErrorDecision {
			if a < 2 {
				return RetryBatch(0)
			}
			return FailBatchAndStop
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mp := newMock()
			mp.fn = func(ctx context.Context, call int, b [][]byte) (PublishAck, error) {
				if call == 0 {
					return rejected("test-topic", len(b), ErrTimeout)
				}
				return rejected("test-topic", len(b), tc.second)
			}
			p := newTestProducer(t, mp, ProducerConfig{OnPublishError: func(attempt int, err error) ErrorDecision {
				return tc.decision(attempt)
			}})
			ctx := prodCtx(t, prodWait)
			f := p.Produce(ctx, []byte("m"))
			ack, err := prodResult(t, f)
			if ack.Reason != ReasonTimeout || !errors.Is(err, ErrTimeout) {
				t.Fatalf("ack %+v err %v: want ReasonTimeout (an earlier attempt may have delivered it)", ack, err)
			}
		})
	}
}
