package handlers

import (
	"context"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
)

// DiscontinueProductHandler retires a product. It is idempotent: a
// discontinued product is returned as it is, with no new event.
type DiscontinueProductHandler struct{ repo Repository }

// Handle implements the command.
func (h DiscontinueProductHandler) Handle(ctx context.Context, cmd *commands.DiscontinueProduct) (*Product, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	return h.repo.Update(ctx, cmd.ProductID, cmd.Idempotency, func(p *Product) error {
		if err := checkVersion(p, cmd.IfVersion); err != nil {
			return err
		}
		if p.State == events.Discontinued {
			return nil
		}
		return conflictIfNotAllowed(p.fire(ctx, events.Discontinue, now()))
	})
}
