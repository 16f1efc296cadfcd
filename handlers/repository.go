package handlers

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/store"
)

// Repository loads and saves products. Every change goes through Create or
// Update: one transaction that changes the row, appends one history row and
// one outbox message per transition, and commits them together.
// PostgresRepository and SQLiteRepository implement it.
type Repository interface {
	// Create saves the new product build returns, with its transitions.
	Create(ctx context.Context, idem commands.Idempotency, build func() (*Product, error)) (*Product, error)
	// Update loads product id, lets fn change it, and saves what fn fired;
	// when fn fires nothing, nothing is written. Commands on one product
	// commit in the order they loaded it.
	Update(ctx context.Context, id string, idem commands.Idempotency, fn func(p *Product) error) (*Product, error)
	// Get returns one product.
	Get(ctx context.Context, id string) (*Product, error)
	// List returns up to limit products ordered by id, after the id after
	// ("" for the first page).
	List(ctx context.Context, after string, limit int) ([]*Product, error)
	// History returns a product's transitions in order.
	History(ctx context.Context, id string) ([]envelope.Event, error)
}

// recall looks for the outcome of an earlier command with the same
// idempotency key; done reports that it was found and put in *saved.
func recall(ctx context.Context, tx store.Idempotent, idem commands.Idempotency, saved **Product) (done bool, err error) {
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
func remember(ctx context.Context, tx store.Idempotent, idem commands.Idempotency, p *Product) error {
	if idem.Key == "" {
		return nil
	}
	body, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("outcome: %w", err)
	}
	return tx.Remember(ctx, idem.Key, store.Outcome{Fingerprint: idem.Fingerprint, Response: body})
}

// ErrKeyReused refuses an idempotency key that an earlier, different request used.
var ErrKeyReused = apperr.Field("Idempotency-Key", "was used for a different request")

func notFound(id string) error {
	return apperr.Errorf(apperr.NotFound, "product %q not found", id)
}

// commandTx is what a command's transaction offers on either store.
type commandTx interface {
	store.Recorder
	store.Locker
	store.Idempotent
}

// productRows is one store's SQL for the products table, inside a command.
type productRows[T commandTx] struct {
	// insert adds p; a name already taken is an apperr.Conflict.
	insert func(ctx context.Context, tx T, p *Product) error
	// load reads product id (locked for the transaction where the store
	// needs it); a missing one is notFound.
	load func(ctx context.Context, tx T, id string) (*Product, error)
	// save writes p's changed columns.
	save func(ctx context.Context, tx T, p *Product) error
}

// createIn is Repository.Create on s: recall an earlier outcome, or insert
// the new product, append its transitions and remember the outcome, in one
// transaction.
func createIn[T commandTx](ctx context.Context, s store.Store[T], rows productRows[T], idem commands.Idempotency,
	build func() (*Product, error)) (*Product, error) {
	var saved *Product
	err := s.InTx(ctx, func(ctx context.Context, tx T) error {
		if done, err := recall(ctx, tx, idem, &saved); done || err != nil {
			return err
		}
		p, err := build()
		if err != nil {
			return err
		}
		if err := rows.insert(ctx, tx, p); err != nil {
			return err
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

// updateIn is Repository.Update on s: recall an earlier outcome, or lock
// and load product id, let fn change it, and save and append what fn fired
// (nothing when it fired nothing), in one transaction.
func updateIn[T commandTx](ctx context.Context, s store.Store[T], rows productRows[T], id string, idem commands.Idempotency,
	fn func(p *Product) error) (*Product, error) {
	var saved *Product
	err := s.InTx(ctx, func(ctx context.Context, tx T) error {
		if done, err := recall(ctx, tx, idem, &saved); done || err != nil {
			return err
		}
		if err := tx.LockEntity(ctx, events.EntityType, id); err != nil {
			return err
		}
		p, err := rows.load(ctx, tx, id)
		if err != nil {
			return err
		}
		if err := fn(p); err != nil {
			return err
		}
		if len(p.changes) > 0 {
			if err := rows.save(ctx, tx, p); err != nil {
				return err
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
