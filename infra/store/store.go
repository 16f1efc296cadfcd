// Package store is the contract between entity repositories and the
// framework's storage: a transaction that records transitions (history and
// outbox together) and a read of an entity's history. pgstore implements it
// on PostgreSQL and sqlitestore on an embedded SQLite file; storetest is the
// conformance suite both pass.
package store

import (
	"context"
	"encoding/json"

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

// Locker serialises the transactions of one entity. A command on an
// existing entity calls it first, so that commands on one entity commit
// (and their events reach the outbox) in the order they took the lock.
type Locker interface {
	LockEntity(ctx context.Context, entityType, entityID string) error
}

// Outcome is what a command sent with an idempotency key answered: the
// fingerprint of the request (so a key reused for another request is
// caught) and the response.
type Outcome struct {
	Fingerprint string
	Response    json.RawMessage
}

// Recaller finds the outcome recorded under an idempotency key.
type Recaller interface {
	// Recall reports the committed outcome of key, if any. Inside a
	// transaction it also serialises the commands that carry key until the
	// transaction ends, so that only one of them fires.
	Recall(ctx context.Context, key string) (Outcome, bool, error)
}

// Idempotent is the part of a command's transaction that makes a retried
// request return its first outcome: Recall first, and Remember the outcome
// in the same transaction, so the outcome commits with the command or not
// at all.
type Idempotent interface {
	Recaller
	Remember(ctx context.Context, key string, o Outcome) error
}
