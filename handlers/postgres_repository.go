package handlers

import (
	"context"
	"embed"
	"encoding/json"
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

// Repository loads and saves products. Every change goes through Create or
// Update: one transaction that changes the row, appends one history row and
// one outbox message per transition, and commits them together.
type Repository struct {
	store *pgstore.Store
}

// NewRepository returns a Repository over store.
func NewRepository(store *pgstore.Store) *Repository { return &Repository{store: store} }

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

// Create saves a new product that build returns, with its transitions.
func (r *Repository) Create(ctx context.Context, idem commands.Idempotency, build func() (*Product, error)) (*Product, error) {
	var saved *Product
	err := r.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if done, err := recall(ctx, tx, idem, &saved); done || err != nil {
			return err
		}
		p, err := build()
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO products (`+productColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
			p.ID, p.Name, p.Price, p.Inventory, p.State, p.Version, p.CreatedAt, p.UpdatedAt)
		if pgstore.IsUniqueViolation(err, "products_name_key") {
			return apperr.Errorf(apperr.Conflict, "a product named %q exists", p.Name)
		}
		if err != nil {
			return fmt.Errorf("insert product: %w", err)
		}
		if err := tx.Append(ctx, p.changes...); err != nil {
			return err
		}
		saved = p
		return remember(ctx, tx, idem, p)
	})
	if err != nil {
		return nil, err
	}
	saved.changes = nil
	return saved, nil
}

// Update locks product id, lets fn change it, and saves what fn fired.
// Commands on one product serialise on an advisory lock taken first, before
// the transaction has an xid, and then on the row lock; so their xids, and
// the relay's publishing order, follow lock order. When fn fires nothing,
// nothing is written.
func (r *Repository) Update(ctx context.Context, id string, idem commands.Idempotency, fn func(p *Product) error) (*Product, error) {
	if uuid.Validate(id) != nil {
		return nil, notFound(id)
	}
	var saved *Product
	err := r.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if done, err := recall(ctx, tx, idem, &saved); done || err != nil {
			return err
		}
		if err := tx.LockEntity(ctx, events.EntityType, id); err != nil {
			return err
		}
		p, err := scanProduct(tx.QueryRow(ctx, `SELECT `+productColumns+` FROM products WHERE id = $1 FOR UPDATE`, id))
		if errors.Is(err, pgx.ErrNoRows) {
			return notFound(id)
		}
		if err != nil {
			return fmt.Errorf("load product: %w", err)
		}
		if err := fn(p); err != nil {
			return err
		}
		if len(p.changes) > 0 {
			_, err = tx.Exec(ctx, `UPDATE products SET name = $2, price = $3, inventory = $4, state = $5, version = $6, updated_at = $7 WHERE id = $1`,
				p.ID, p.Name, p.Price, p.Inventory, p.State, p.Version, p.UpdatedAt)
			if err != nil {
				return fmt.Errorf("update product: %w", err)
			}
			if err := tx.Append(ctx, p.changes...); err != nil {
				return err
			}
		}
		saved = p
		return remember(ctx, tx, idem, p)
	})
	if err != nil {
		return nil, err
	}
	saved.changes = nil
	return saved, nil
}

// Get returns one product.
func (r *Repository) Get(ctx context.Context, id string) (*Product, error) {
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
func (r *Repository) List(ctx context.Context, after string, limit int) ([]*Product, error) {
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
func (r *Repository) History(ctx context.Context, id string) ([]envelope.Event, error) {
	if _, err := r.Get(ctx, id); err != nil {
		return nil, err
	}
	return r.store.History(ctx, events.EntityType, id)
}

// recall looks for the outcome of an earlier command with the same
// idempotency key; done reports that it was found and put in *saved.
func recall(ctx context.Context, tx *pgstore.Tx, idem commands.Idempotency, saved **Product) (done bool, err error) {
	if idem.Key == "" {
		return false, nil
	}
	o, found, err := tx.Recall(ctx, idem.Key)
	if err != nil || !found {
		return false, err
	}
	if o.Fingerprint != idem.Fingerprint {
		return true, ErrKeyReused
	}
	p := new(Product)
	if err := json.Unmarshal(o.Response, p); err != nil {
		return true, fmt.Errorf("recalled outcome: %w", err)
	}
	*saved = p
	return true, nil
}

// remember records the command's outcome under its idempotency key.
func remember(ctx context.Context, tx *pgstore.Tx, idem commands.Idempotency, p *Product) error {
	if idem.Key == "" {
		return nil
	}
	body, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("outcome: %w", err)
	}
	return tx.Remember(ctx, idem.Key, pgstore.Outcome{Fingerprint: idem.Fingerprint, Response: body})
}

// ErrKeyReused refuses an idempotency key that an earlier, different request used.
var ErrKeyReused = apperr.Field("Idempotency-Key", "was used for a different request")

func notFound(id string) error {
	return apperr.Errorf(apperr.NotFound, "product %q not found", id)
}
