package handlers

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sqlitestore"
)

//go:embed sqlite_migrations/*.sql
var sqliteMigrations embed.FS

// SQLiteMigrations is the products schema of the embedded mode, applied
// after sqlitestore.Framework().
func SQLiteMigrations() sqlitestore.MigrationSet {
	sub, _ := fs.Sub(sqliteMigrations, "sqlite_migrations")
	return sqlitestore.MigrationSet{Name: "products", FS: sub}
}

// sqliteTime is how the SQLite products table keeps times: UTC, fixed
// width, microseconds (PostgreSQL's precision), so text order is time order.
const sqliteTime = "2006-01-02T15:04:05.000000Z"

// SQLiteRepository is the Repository of the embedded mode. Its transactions
// hold SQLite's single write lock from their first statement, so commands
// commit (and reach the outbox) in the order they loaded their product.
type SQLiteRepository struct {
	store *sqlitestore.Store
}

// NewSQLiteRepository returns a Repository over store.
func NewSQLiteRepository(store *sqlitestore.Store) *SQLiteRepository {
	return &SQLiteRepository{store: store}
}

type sqlScanner interface{ Scan(dest ...any) error }

func scanSQLiteProduct(row sqlScanner) (*Product, error) {
	p := new(Product)
	var created, updated string
	if err := row.Scan(&p.ID, &p.Name, &p.Price, &p.Inventory, &p.State, &p.Version, &created, &updated); err != nil {
		return nil, err
	}
	var err error
	if p.CreatedAt, err = time.Parse(sqliteTime, created); err != nil {
		return nil, fmt.Errorf("created_at %q: %w", created, err)
	}
	if p.UpdatedAt, err = time.Parse(sqliteTime, updated); err != nil {
		return nil, fmt.Errorf("updated_at %q: %w", updated, err)
	}
	return p, nil
}

// canonicalID is id in the lowercase hyphenated form ids are stored in
// (PostgreSQL's uuid type accepts every form; a TEXT key does not).
func canonicalID(id string) (string, bool) {
	u, err := uuid.Parse(id)
	if err != nil {
		return id, false
	}
	return u.String(), true
}

func sqliteTimeText(t time.Time) string { return t.UTC().Format(sqliteTime) }

// sqliteRows is the products table's SQL on SQLite. No row lock: the
// transaction holds the database's single write lock from its first
// statement.
var sqliteRows = productRows[*sqlitestore.Tx]{
	insert: func(ctx context.Context, tx *sqlitestore.Tx, p *Product) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO products (`+productColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			p.ID, p.Name, p.Price, p.Inventory, p.State, p.Version, sqliteTimeText(p.CreatedAt), sqliteTimeText(p.UpdatedAt))
		if sqlitestore.IsUniqueViolation(err, "products.name") {
			return apperr.Errorf(apperr.Conflict, "a product named %q exists", p.Name)
		}
		if err != nil {
			return fmt.Errorf("insert product: %w", err)
		}
		return nil
	},
	load: func(ctx context.Context, tx *sqlitestore.Tx, id string) (*Product, error) {
		p, err := scanSQLiteProduct(tx.QueryRowContext(ctx, `SELECT `+productColumns+` FROM products WHERE id = ?`, id))
		if errors.Is(err, sql.ErrNoRows) {
			return nil, notFound(id)
		}
		if err != nil {
			return nil, fmt.Errorf("load product: %w", err)
		}
		return p, nil
	},
	save: func(ctx context.Context, tx *sqlitestore.Tx, p *Product) error {
		_, err := tx.ExecContext(ctx, `UPDATE products SET name = ?, price = ?, inventory = ?, state = ?, version = ?, updated_at = ? WHERE id = ?`,
			p.Name, p.Price, p.Inventory, p.State, p.Version, sqliteTimeText(p.UpdatedAt), p.ID)
		if err != nil {
			return fmt.Errorf("update product: %w", err)
		}
		return nil
	},
}

// Create implements Repository.
func (r *SQLiteRepository) Create(ctx context.Context, idem commands.Idempotency, build func() (*Product, error)) (*Product, error) {
	return createIn(ctx, r.store, sqliteRows, idem, build)
}

// Update implements Repository.
func (r *SQLiteRepository) Update(ctx context.Context, id string, idem commands.Idempotency, fn func(p *Product) error) (*Product, error) {
	id, ok := canonicalID(id)
	if !ok {
		return nil, notFound(id)
	}
	return updateIn(ctx, r.store, sqliteRows, id, idem, fn)
}

// Get implements Repository.
func (r *SQLiteRepository) Get(ctx context.Context, id string) (*Product, error) {
	id, ok := canonicalID(id)
	if !ok {
		return nil, notFound(id)
	}
	p, err := scanSQLiteProduct(r.store.DB().Reader().QueryRowContext(ctx, `SELECT `+productColumns+` FROM products WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, notFound(id)
	}
	if err != nil {
		return nil, sqlitestore.Classify(fmt.Errorf("get product: %w", err))
	}
	return p, nil
}

// List implements Repository.
func (r *SQLiteRepository) List(ctx context.Context, after string, limit int) ([]*Product, error) {
	if after == "" {
		after = uuid.Nil.String()
	} else if c, ok := canonicalID(after); ok {
		after = c
	} else {
		return nil, apperr.Field("after", "must be a product id")
	}
	rows, err := r.store.DB().Reader().QueryContext(ctx, `SELECT `+productColumns+` FROM products WHERE id > ? ORDER BY id LIMIT ?`, after, limit)
	if err != nil {
		return nil, sqlitestore.Classify(fmt.Errorf("list products: %w", err))
	}
	defer rows.Close()
	products := []*Product{}
	for rows.Next() {
		p, err := scanSQLiteProduct(rows)
		if err != nil {
			return nil, sqlitestore.Classify(fmt.Errorf("list products: %w", err))
		}
		products = append(products, p)
	}
	if err := rows.Err(); err != nil {
		return nil, sqlitestore.Classify(fmt.Errorf("list products: %w", err))
	}
	return products, nil
}

// History implements Repository.
func (r *SQLiteRepository) History(ctx context.Context, id string) ([]envelope.Event, error) {
	if _, err := r.Get(ctx, id); err != nil {
		return nil, err
	}
	return r.store.History(ctx, events.EntityType, id)
}

var (
	_ Repository = (*SQLiteRepository)(nil)
	_ Repository = (*PostgresRepository)(nil)
)
