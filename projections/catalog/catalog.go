// Package catalog is the catalog read model: every product's current name,
// price, inventory, state and version, kept in PostgreSQL schema "catalog"
// by the projection runtime from the Product events.
package catalog

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// Schema is the PostgreSQL schema of the read model and of its runtime state.
const Schema = "catalog"

//go:embed migrations/*.sql
var migrations embed.FS

// Migrations is the catalog schema.
func Migrations() pgstore.MigrationSet {
	sub, _ := fs.Sub(migrations, "migrations")
	return pgstore.MigrationSet{Name: "catalog", FS: sub, LockID: 0x57a7e0101}
}

// Projection writes Product events into catalog.products. It also checks
// each transition against the published Product machine: an event whose
// from→to the machine does not allow is counted and logged (and applied:
// the catalog mirrors the producer, the count tells an operator that the
// producer broke the contract).
type Projection struct {
	logger *slog.Logger

	mu      sync.Mutex
	illegal map[string]struct{} // event ids seen breaking the contract (bounded)
}

// illegalTransitions counts distinct events that broke the Product machine.
var illegalTransitions = prometheus.NewCounter(prometheus.CounterOpts{
	Namespace: "statemill", Subsystem: "catalog", Name: "illegal_transitions_total",
	Help: "Product events whose from→to the published Product machine does not allow.",
})

// Collectors are the catalog's metrics.
func Collectors() []prometheus.Collector { return []prometheus.Collector{illegalTransitions} }

// maxIllegalRemembered bounds the memory spent de-duplicating illegal events
// (each event is applied to two generations during a rebuild, and may be
// redelivered).
const maxIllegalRemembered = 10000

// NewProjection returns the catalog projection.
func NewProjection(logger *slog.Logger) *Projection {
	if logger == nil {
		logger = slog.Default()
	}
	return &Projection{logger: logger, illegal: map[string]struct{}{}}
}

// IllegalTransitions is the number of distinct illegal events seen by this process.
func (p *Projection) IllegalTransitions() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return int64(len(p.illegal))
}

func (p *Projection) checkContract(e envelope.Event) {
	if events.ProductMachine.Allows(e.Event, e.From, e.To) {
		return
	}
	p.mu.Lock()
	_, seen := p.illegal[e.ID]
	if !seen && len(p.illegal) < maxIllegalRemembered {
		p.illegal[e.ID] = struct{}{}
	}
	p.mu.Unlock()
	if !seen {
		illegalTransitions.Inc()
		p.logger.Warn("illegal product transition received", "event_id", e.ID, "entity_id", e.EntityID,
			"event", e.Event, "from", e.From, "to", e.To, "version", e.Version)
	}
}

// row is one product as the catalog stores it.
type row struct {
	id        string
	attrs     events.ProductAttributes
	version   int64
	updatedAt time.Time
}

// Apply implements projection.Projection: one upsert for the batch, the
// newest version of each product winning.
func (p *Projection) Apply(ctx context.Context, tx pgx.Tx, gen int64, batch []envelope.Event) error {
	newest := make(map[string]row, len(batch))
	for _, e := range batch {
		if e.EntityType != events.EntityType {
			continue
		}
		p.checkContract(e)
		var a events.ProductAttributes
		if err := e.DecodeAttributes(&a); err != nil {
			return fmt.Errorf("catalog: event %s: attributes: %w", e.ID, err)
		}
		if a.State == "" {
			a.State = e.To
		}
		if r, ok := newest[e.EntityID]; !ok || e.Version > r.version {
			newest[e.EntityID] = row{id: e.EntityID, attrs: a, version: e.Version, updatedAt: e.OccurredAt}
		}
	}
	if len(newest) == 0 {
		return nil
	}
	// Rows in id order: the live and the replay transactions both write the
	// shadow generation during a rebuild, and a fixed lock order keeps them
	// from deadlocking.
	order := make([]string, 0, len(newest))
	for id := range newest {
		order = append(order, id)
	}
	slices.Sort(order)
	n := len(newest)
	ids, names, states := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
	prices, stock, versions := make([]int64, 0, n), make([]int64, 0, n), make([]int64, 0, n)
	times := make([]time.Time, 0, n)
	for _, id := range order {
		r := newest[id]
		ids, names, states = append(ids, r.id), append(names, r.attrs.Name), append(states, r.attrs.State)
		prices, stock, versions = append(prices, r.attrs.Price), append(stock, r.attrs.Inventory), append(versions, r.version)
		times = append(times, r.updatedAt)
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO catalog.products AS p (generation, id, name, price, inventory, state, version, updated_at)
		SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], $8::timestamptz[])
		ON CONFLICT (generation, id) DO UPDATE SET
			name = EXCLUDED.name, price = EXCLUDED.price, inventory = EXCLUDED.inventory,
			state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
		WHERE p.version < EXCLUDED.version`,
		gen, ids, names, prices, stock, states, versions, times)
	if err != nil {
		return fmt.Errorf("catalog: upsert: %w", err)
	}
	return nil
}

// Clear implements projection.Projection.
func (p *Projection) Clear(ctx context.Context, tx pgx.Tx, gen int64) error {
	if _, err := tx.Exec(ctx, `DELETE FROM catalog.products WHERE generation = $1`, gen); err != nil {
		return fmt.Errorf("catalog: clear generation %d: %w", gen, err)
	}
	return nil
}
