package main

import "github.com/clusterpubsub/pubsub"

// latencyLevel is one way the latency scenario publishes: a row of its
// results.
type latencyLevel struct {
	name  string
	opts  []pubsub.PublishOption
	check func(pubsub.PublishAck) bool // whether an ack without error is the expected one
	note  string
	where bool // the notes say where publisher, owner and subscriber are
}

// latencyLevels are measured in this order, each with --count publishes.
var latencyLevels = []latencyLevel{
	{
		name:  "ack=delivered",
		opts:  []pubsub.PublishOption{pubsub.WithAck(pubsub.AckDelivered)},
		check: func(a pubsub.PublishAck) bool { return a.Status == pubsub.Accepted && a.Delivered == 1 },
		note:  "the default (Publish)",
		where: true,
	},
	{
		name:  "ack=accepted",
		opts:  []pubsub.PublishOption{pubsub.WithAck(pubsub.AckAccepted)},
		check: func(a pubsub.PublishAck) bool { return a.Status == pubsub.Accepted },
		note:  "returns once the owner accepted",
	},
	{
		name:  "ack=none",
		opts:  []pubsub.PublishOption{pubsub.WithAck(pubsub.AckNone)},
		check: func(pubsub.PublishAck) bool { return true },
		note:  "returns once merged into the publisher's outbox (written by its flusher)",
	},
}
