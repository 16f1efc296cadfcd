package handlers

import (
	"context"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
)

// CreateProductHandler creates a product: create, then add_inventory when
// there is initial inventory, both in one transaction (versions 1 and 2).
type CreateProductHandler struct{ repo Repository }

// Handle implements the command.
func (h CreateProductHandler) Handle(ctx context.Context, cmd *commands.CreateProduct) (*Product, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	return h.repo.Create(ctx, cmd.Idempotency, func() (*Product, error) {
		t := now()
		p := newProduct(cmd.Name, cmd.Price, t)
		if err := p.fire(ctx, events.Create, t); err != nil {
			return nil, err
		}
		if cmd.InitialInventory > 0 {
			p.Inventory = cmd.InitialInventory
			if err := p.fire(ctx, events.AddInventory, t); err != nil {
				return nil, err
			}
		}
		return p, nil
	})
}
