package pubsub

import (
	"context"
	"errors"
	"testing"
	"time"
)

// waitingPub is an orderedPublisher that behaves like a Node owner towards
// a pipelined producer: it holds a batch (ORDER_WAIT, retried) until the
// producer's previous batch was accepted or is settled. The first batch
// fails, once the second was issued.
type waitingPub struct {
	*mockPub
	secondIssued chan struct{}
}

func (w waitingPub) publishBatchIssued(ctx context.Context, topic string, batch msgBatch, o issueOpts) (PublishAck, error) {
	o.issued()
	if o.seq == 1 {
		select {
		case <-w.secondIssued:
		case <-ctx.Done():
		}
		return rejected(topic, batch.len(), errors.New("owner unavailable"))
	}
	if o.seq == 2 {
		close(w.secondIssued)
	}
	for o.settled() < o.prev { // ORDER_WAIT: the owner never accepted the previous batch
		select {
		case <-ctx.Done():
			return rejected(topic, batch.len(), ctx.Err())
		case <-time.After(time.Millisecond): // the requester's retry backoff
		}
	}
	return w.mockPub.do(ctx, topic, batch.data, nil)
}

// Regression (review): with MaxInFlight 4 (the default) and
// FailBatchAndStop (the default), a batch that failed and stopped the
// producer counted as settled (completeHead), so the owner let the batch
// behind it, held in ORDER_WAIT because the failed one never reached it,
// through: messages after the failure were delivered although the producer
// stopped there. The stopping batch never settles; the one behind it times
// out unpublished.
func TestProducerStopPublishesNothingBehindTheFailedBatch(t *testing.T) {
	mp := newMock()
	p := newTestProducer(t, waitingPub{mp, make(chan struct{})}, ProducerConfig{BatchSize: 1, PublishTimeout: 300 * time.Millisecond})
	ctx := prodCtx(t, prodWait)
	f1 := p.Produce(ctx, pm(1))
	f2 := p.Produce(ctx, pm(2))
	if _, err := f1.Wait(ctx); err == nil {
		t.Fatal("the first batch should fail")
	}
	if _, err := f2.Wait(ctx); err == nil {
		t.Errorf("the batch behind the one that stopped the producer was published after it (published: %v)", mp.flat())
	}
	if got := mp.flat(); len(got) != 0 {
		t.Errorf("published %v after the failed batch", got)
	}
}
