package catalog

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
)

// Queries are the catalog's reads: Reader answers them from PostgreSQL,
// Memory from memory.
type Queries interface {
	// Products lists products ordered by id, all of them or those in state.
	Products(ctx context.Context, state string) ([]Product, error)
	// Stats counts products by state and sums the inventory.
	Stats(ctx context.Context) (Stats, error)
}

// Memory is the catalog held in memory, for the embedded mode: a
// projection.View empties it and fills it from a latest replay whenever it
// connects, then keeps it live; a rebuild is another latest replay. It
// applies the same rules as the PostgreSQL projection (newest version wins,
// contract check).
type Memory struct {
	contract *Projection // its contract check and counter

	mu        sync.RWMutex
	products  map[string]Product
	malformed int64
}

// NewMemory returns an empty in-memory catalog.
func NewMemory(logger *slog.Logger) *Memory {
	return &Memory{contract: NewProjection(logger), products: map[string]Product{}}
}

// IllegalTransitions is the number of distinct illegal events seen.
func (m *Memory) IllegalTransitions() int64 { return m.contract.IllegalTransitions() }

// Reset implements projection.MemoryProjection.
func (m *Memory) Reset() {
	m.mu.Lock()
	clear(m.products)
	m.mu.Unlock()
}

// Apply implements projection.MemoryProjection: an event whose version is
// not newer than the product's changes nothing.
func (m *Memory) Apply(evs []envelope.Event) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range evs {
		if e.EntityType != events.EntityType {
			continue
		}
		m.contract.checkContract(e)
		var a events.ProductAttributes
		if err := e.DecodeAttributes(&a); err != nil {
			m.malformed++
			m.contract.logger.Warn("catalog: skipped an event whose attributes cannot be read", "event_id", e.ID, "err", err)
			continue
		}
		if cur, ok := m.products[e.EntityID]; ok && cur.Version >= e.Version {
			continue
		}
		m.products[e.EntityID] = Product{
			ID: e.EntityID, Name: a.Name, Price: a.Price, Inventory: a.Inventory,
			State: cmp.Or(a.State, e.To), Version: e.Version, UpdatedAt: e.OccurredAt.UTC(),
		}
	}
}

// Products implements Queries.
func (m *Memory) Products(_ context.Context, state string) ([]Product, error) {
	if state != "" && !slices.Contains(events.ProductMachine.States, state) {
		return nil, apperr.Field("state", fmt.Sprintf("must be one of %v", events.ProductMachine.States))
	}
	m.mu.RLock()
	out := make([]Product, 0, len(m.products))
	for _, p := range m.products {
		if state == "" || p.State == state {
			out = append(out, p)
		}
	}
	m.mu.RUnlock()
	slices.SortFunc(out, func(a, b Product) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

// Stats implements Queries.
func (m *Memory) Stats(context.Context) (Stats, error) {
	s := Stats{ByState: map[string]int64{}}
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, p := range m.products {
		s.ByState[p.State]++
		s.Products++
		s.Inventory += p.Inventory
	}
	return s, nil
}

var (
	_ Queries = (*Memory)(nil)
	_ Queries = (*Reader)(nil)
)
