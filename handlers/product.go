// Package handlers holds the Product entity and its guards, one file per
// command handler, and the repository through which every command changes a
// product: one transaction that locks, fires, updates and records.
package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/statemachine"
)

// Product is the write model of a product.
type Product struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Price     int64     `json:"price"`
	Inventory int64     `json:"inventory"`
	State     string    `json:"state"`
	Version   int64     `json:"version"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`

	// changes are the transitions fired since the product was loaded; the
	// repository records them.
	changes []*envelope.Event
}

// productMachine is the Product machine bound to its guards.
var productMachine = mustMachine()

func mustMachine() *statemachine.Machine[*Product] {
	m, err := statemachine.NewWithConfig(statemachine.Config[*Product]{
		Definition: events.ProductMachine,
		Guards: map[string]statemachine.Guard[*Product]{
			// has_inventory is checked after the reduction was applied.
			events.GuardHasInventory: func(p *Product) bool { return p.Inventory > 0 },
		},
		OnTransition: func(t statemachine.Transition) {
			transitionsTotal.WithLabelValues(t.Event, t.From, t.To).Inc()
		},
	})
	if err != nil {
		panic(fmt.Sprintf("the Product machine is invalid: %v", err)) // a programming error, caught by every test
	}
	return m
}

// newProduct returns a product in the machine's initial state, not yet created.
func newProduct(name string, price int64, now time.Time) *Product {
	return &Product{
		ID:        uuid.Must(uuid.NewV7()).String(),
		Name:      name,
		Price:     price,
		State:     events.ProductMachine.Initial,
		CreatedAt: now,
		UpdatedAt: now,
	}
}

// fire runs event through the machine and, when it is allowed, moves the
// product to the target state and records the transition.
func (p *Product) fire(ctx context.Context, event string, now time.Time) error {
	t, err := productMachine.Fire(p, p.State, event)
	if err != nil {
		return err
	}
	p.State = t.To
	p.Version++
	p.UpdatedAt = now
	attrs, err := json.Marshal(events.ProductAttributes{
		ID: p.ID, Name: p.Name, Price: p.Price, Inventory: p.Inventory, State: p.State,
	})
	if err != nil {
		return fmt.Errorf("snapshot attributes: %w", err)
	}
	p.changes = append(p.changes, &envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		EntityType:    events.EntityType,
		EntityID:      p.ID,
		Version:       p.Version,
		Event:         t.Event,
		From:          t.From,
		To:            t.To,
		Attributes:    attrs,
		OccurredAt:    now,
		CorrelationID: correlationID(ctx),
	})
	return nil
}

// correlationID is the request's correlation id, or a fresh one for work
// that did not come from a request.
func correlationID(ctx context.Context) string {
	if id := envelope.CorrelationID(ctx); id != "" {
		return id
	}
	return uuid.NewString()
}

// now is the time of a transition, at PostgreSQL's precision, so that what
// a command returns equals what a later read returns.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }
