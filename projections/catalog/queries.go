package catalog

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/projection"
)

// Product is a product as the catalog shows it.
type Product struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Price     int64     `json:"price"`
	Inventory int64     `json:"inventory"`
	State     string    `json:"state"`
	Version   int64     `json:"version"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Stats are computed from the rows, so duplicates cannot inflate them.
type Stats struct {
	Products  int64            `json:"products"`
	Inventory int64            `json:"inventory"`
	ByState   map[string]int64 `json:"by_state"`
}

// Reader answers queries from the active generation of the worker named name.
type Reader struct {
	pool       *pgxpool.Pool
	generation string // scalar subquery: the active generation
}

// NewReader returns a Reader for the catalog kept by worker name.
func NewReader(pool *pgxpool.Pool, name string) *Reader {
	return &Reader{pool: pool, generation: projection.ActiveGenerationSQL(Schema, name)}
}

// Products lists products ordered by id, all of them or those in state.
func (r *Reader) Products(ctx context.Context, state string) ([]Product, error) {
	if state != "" && !slices.Contains(events.ProductMachine.States, state) {
		return nil, apperr.Field("state", fmt.Sprintf("must be one of %v", events.ProductMachine.States))
	}
	rows, err := r.pool.Query(ctx, `
		SELECT id, name, price, inventory, state, version, updated_at FROM catalog.products
		WHERE generation = `+r.generation+` AND ($1 = '' OR state = $1)
		ORDER BY id`, state)
	if err != nil {
		return nil, pgstore.Classify(fmt.Errorf("catalog: products: %w", err))
	}
	products, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Product, error) {
		var p Product
		err := row.Scan(&p.ID, &p.Name, &p.Price, &p.Inventory, &p.State, &p.Version, &p.UpdatedAt)
		p.UpdatedAt = p.UpdatedAt.UTC()
		return p, err
	})
	if err != nil {
		return nil, pgstore.Classify(fmt.Errorf("catalog: products: %w", err))
	}
	if products == nil {
		products = []Product{}
	}
	return products, nil
}

// Stats counts products by state and sums the inventory.
func (r *Reader) Stats(ctx context.Context) (Stats, error) {
	rows, err := r.pool.Query(ctx, `
		SELECT state, count(*), coalesce(sum(inventory), 0)::bigint FROM catalog.products
		WHERE generation = `+r.generation+` GROUP BY state`)
	if err != nil {
		return Stats{}, pgstore.Classify(fmt.Errorf("catalog: stats: %w", err))
	}
	defer rows.Close()
	s := Stats{ByState: map[string]int64{}}
	for rows.Next() {
		var state string
		var n, inv int64
		if err := rows.Scan(&state, &n, &inv); err != nil {
			return Stats{}, fmt.Errorf("catalog: stats: %w", err)
		}
		s.ByState[state] = n
		s.Products += n
		s.Inventory += inv
	}
	if err := rows.Err(); err != nil {
		return Stats{}, pgstore.Classify(fmt.Errorf("catalog: stats: %w", err))
	}
	return s, nil
}
