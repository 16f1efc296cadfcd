// Package store is the contract between entity repositories and the
// framework's storage: a transaction that records transitions (history and
// outbox together) and a read of an entity's history. pgstore implements it
// on PostgreSQL; an embedded implementation can stand beside it.
package store

import (
	"context"

	"github.com/statemill/statemill/infra/envelope"
)

// Recorder appends transitions to history and the outbox inside the
// transaction that changes the entity, filling in each event's Sequence.
type Recorder interface {
	Append(ctx context.Context, events ...*envelope.Event) error
}

// Store runs one command's transaction. T is the implementation's
// transaction type: it records transitions and also gives the repository
// access to its own tables.
type Store[T Recorder] interface {
	// InTx commits when fn returns nil and rolls back otherwise; a store
	// that cannot be reached yields an apperr.Unavailable error.
	InTx(ctx context.Context, fn func(ctx context.Context, tx T) error) error
	// History returns an entity's transitions in version order.
	History(ctx context.Context, entityType, entityID string) ([]envelope.Event, error)
}
