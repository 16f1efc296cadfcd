package handlers

import (
	"context"
	"math"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
)

// AdjustInventoryHandler adds stock (add_inventory) or removes it
// (reduce_inventory, which lands in out_of_stock when nothing is left).
type AdjustInventoryHandler struct{ repo Repository }

// Handle implements the command. Precedence (DESIGN §4): invalid input,
// unknown product, stale If-Match, discontinued, below zero.
func (h AdjustInventoryHandler) Handle(ctx context.Context, cmd *commands.AdjustInventory) (*Product, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	n := *cmd.Adjust
	return h.repo.Update(ctx, cmd.ProductID, cmd.Idempotency, func(p *Product) error {
		if err := checkVersion(p, cmd.IfVersion); err != nil {
			return err
		}
		if p.State == events.Discontinued {
			return apperr.Errorf(apperr.Conflict, "product %s is discontinued", p.ID)
		}
		if n < 0 && p.Inventory+n < 0 {
			return apperr.Field("adjust_inventory", "would take the inventory below zero")
		}
		if n > 0 && p.Inventory > math.MaxInt64-n {
			return apperr.Field("adjust_inventory", "would overflow the inventory")
		}
		p.Inventory += n
		event := events.AddInventory
		if n < 0 {
			event = events.ReduceInventory
		}
		return conflictIfNotAllowed(p.fire(ctx, event, now()))
	})
}
