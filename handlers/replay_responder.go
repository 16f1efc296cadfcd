package handlers

import (
	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/replay"
)

// ReplayQueue is the durable queue the products service takes replay
// requests from (DESIGN §6).
const ReplayQueue = "products.replay_requests"

// NewReplayResponder answers replay requests for products: cfg names the
// pool, broker and topology; the entity types and, unless cfg sets one, the
// request queue are the products'.
func NewReplayResponder(cfg replay.Config) (*replay.Responder, error) {
	cfg.EntityTypes = []string{events.EntityType}
	if cfg.QueueName == "" {
		cfg.QueueName = ReplayQueue
	}
	return replay.NewResponder(cfg)
}
