package handlers

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Migrations is the products schema, applied after the framework's.
func Migrations() pgstore.MigrationSet {
	sub, _ := fs.Sub(migrations, "migrations")
	return pgstore.MigrationSet{Name: "products", FS: sub, LockID: 0x57a7e0002}
}

// PostgresRepository is the Repository on PostgreSQL.
type PostgresRepository struct {
	store *pgstore.Store
}

// NewPostgresRepository returns a Repository over store.
func NewPostgresRepository(store *pgstore.Store) *PostgresRepository {
	return &PostgresRepository{store: store}
}

const productColumns = `id, name, price, inventory, state, version, created_at, updated_at`

func scanProduct(row pgx.Row) (*Product, error) {
	p := new(Product)
	err := row.Scan(&p.ID, &p.Name, &p.Price, &p.Inventory, &p.State, &p.Version, &p.CreatedAt, &p.UpdatedAt)
	if err != nil {
		return nil, err
	}
	p.CreatedAt, p.UpdatedAt = p.CreatedAt.UTC(), p.UpdatedAt.UTC()
	return p, nil
}

// postgresRows is the products table's SQL on PostgreSQL.
var postgresRows = productRows[*pgstore.Tx]{
	insert: func(ctx context.Context, tx *pgstore.Tx, p *Product) error {
		_, err := tx.Exec(ctx, `INSERT INTO products (`+productColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
			p.ID, p.Name, p.Price, p.Inventory, p.State, p.Version, p.CreatedAt, p.UpdatedAt)
		if pgstore.IsUniqueViolation(err, "products_name_key") {
			return apperr.Errorf(apperr.Conflict, "a product named %q exists", p.Name)
		}
		if err != nil {
			return fmt.Errorf("insert product: %w", err)
		}
		return nil
	},
	// After LockEntity, the row lock: commands on one product serialise on
	// the advisory lock taken first, before the transaction has an xid, so
	// their xids, and the relay's publishing order, follow lock order.
	load: func(ctx context.Context, tx *pgstore.Tx, id string) (*Product, error) {
		p, err := scanProduct(tx.QueryRow(ctx, `SELECT `+productColumns+` FROM products WHERE id = $1 FOR UPDATE`, id))
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, notFound(id)
		}
		if err != nil {
			return nil, fmt.Errorf("load product: %w", err)
		}
		return p, nil
	},
	save: func(ctx context.Context, tx *pgstore.Tx, p *Product) error {
		_, err := tx.Exec(ctx, `UPDATE products SET name = $2, price = $3, inventory = $4, state = $5, version = $6, updated_at = $7 WHERE id = $1`,
			p.ID, p.Name, p.Price, p.Inventory, p.State, p.Version, p.UpdatedAt)
		if err != nil {
			return fmt.Errorf("update product: %w", err)
		}
		return nil
	},
}

// Create implements Repository.
func (r *PostgresRepository) Create(ctx context.Context, idem commands.Idempotency, build func() (*Product, error)) (*Product, error) {
	return createIn(ctx, r.store, postgresRows, idem, build)
}

// Update implements Repository.
func (r *PostgresRepository) Update(ctx context.Context, id string, idem commands.Idempotency, fn func(p *Product) error) (*Product, error) {
	if uuid.Validate(id) != nil {
		return nil, notFound(id)
	}
	return updateIn(ctx, r.store, postgresRows, id, idem, fn)
}

// Get returns one product.
func (r *PostgresRepository) Get(ctx context.Context, id string) (*Product, error) {
	if uuid.Validate(id) != nil {
		return nil, notFound(id)
	}
	p, err := scanProduct(r.store.Pool().QueryRow(ctx, `SELECT `+productColumns+` FROM products WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(id)
	}
	if err != nil {
		return nil, pgstore.Classify(fmt.Errorf("get product: %w", err))
	}
	return p, nil
}

// List returns up to limit products ordered by id, after the id after ("" for the first page).
func (r *PostgresRepository) List(ctx context.Context, after string, limit int) ([]*Product, error) {
	if after == "" {
		after = uuid.Nil.String()
	} else if uuid.Validate(after) != nil {
		return nil, apperr.Field("after", "must be a product id")
	}
	rows, err := r.store.Pool().Query(ctx, `SELECT `+productColumns+` FROM products WHERE id > $1 ORDER BY id LIMIT $2`, after, limit)
	if err != nil {
		return nil, pgstore.Classify(fmt.Errorf("list products: %w", err))
	}
	products, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*Product, error) { return scanProduct(row) })
	if err != nil {
		return nil, pgstore.Classify(fmt.Errorf("list products: %w", err))
	}
	return products, nil
}

// History returns a product's transitions in order.
func (r *PostgresRepository) History(ctx context.Context, id string) ([]envelope.Event, error) {
	if _, err := r.Get(ctx, id); err != nil {
		return nil, err
	}
	return r.store.History(ctx, events.EntityType, id)
}
