// Package storetest is the conformance suite of infra/store, in the spirit
// of Watermill's shared pub/sub tests: every store implementation runs Run
// from its own tests with a harness that gives each case a fresh, isolated
// store, and so proves the guarantees a repository relies on (DESIGN §8)
// rather than each implementation testing itself its own way.
package storetest

import (
	"context"
	"testing"

	"github.com/statemill/statemill/infra/store"
)

// Tx is what the suite needs of a store's transaction: it records
// transitions, serialises an entity's commands and keeps idempotency keys.
type Tx interface {
	store.Recorder
	store.Locker
	store.Idempotent
}

// Store is what the suite needs of a store: transactions, history, and the
// recall of an outcome outside a command.
type Store[T Tx] interface {
	store.Store[T]
	store.Recaller
}

// Widgets is the suite's test entity table (id, state, version), which the
// harness creates next to the framework schema: the suite checks that the
// domain's own writes commit and roll back with the transitions. Ids are
// UUID strings.
type Widgets[T Tx] interface {
	// Insert creates widget id in state "initialized" at version 0.
	Insert(ctx context.Context, tx T, id string) error
	// Load reads widget id in tx, after LockEntity, as a command does
	// before it fires (PostgreSQL: SELECT ... FOR UPDATE).
	Load(ctx context.Context, tx T, id string) (state string, version int64, err error)
	// Save sets the state and version of widget id in tx.
	Save(ctx context.Context, tx T, id, state string, version int64) error
	// Get reads the committed widget outside any transaction; found is
	// false when there is none.
	Get(ctx context.Context, id string) (state string, version int64, found bool, err error)
}

// OutboxRow is one outbox row as a relay publishes it.
type OutboxRow struct {
	RoutingKey string            // where it goes live: <entity_type>.<event>
	MessageID  string            // the AMQP message_id: the event id
	Payload    []byte            // the AMQP body: the event JSON
	Metadata   map[string]string // the AMQP headers
}

// Harness is one case's store and the means to look inside it. Every call
// of the constructor given to Run must return a store no other case sees.
type Harness[T Tx] struct {
	Store   Store[T]
	Widgets Widgets[T]
	// Outbox returns every outbox row in the order the relay publishes
	// them (commit order).
	Outbox func(ctx context.Context) ([]OutboxRow, error)
	// IsDuplicateVersion reports whether err is the store refusing a
	// second history row for one (entity type, entity id, version).
	IsDuplicateVersion func(err error) bool
	// Unreachable returns a store whose database cannot be reached (no
	// server, a closed database).
	Unreachable func(t *testing.T) Store[T]
}

func (h Harness[T]) check(t *testing.T) {
	t.Helper()
	if h.Store == nil || h.Widgets == nil || h.Outbox == nil || h.IsDuplicateVersion == nil || h.Unreachable == nil {
		t.Fatal("storetest: the harness leaves a field nil")
	}
}

// Run runs every case against stores from newHarness, each case in
// parallel with its own harness.
func Run[T Tx](t *testing.T, newHarness func(t *testing.T) Harness[T]) {
	cases := []struct {
		name string
		fn   func(t *testing.T, h Harness[T])
	}{
		{"AppendFillsSequencesAndHistoryRoundTrips", testHistoryRoundTrip[T]},
		{"FnErrorRollsBackEverything", testFnErrorRollsBack[T]},
		{"DuplicateVersionIsRefusedWhole", testDuplicateVersion[T]},
		{"OutboxHasOneRowPerEventInCommitOrder", testOutbox[T]},
		{"IdempotencyKeys", testIdempotency[T]},
		{"IdempotencyKeyFiresOnceUnderConcurrency", testIdempotencyConcurrent[T]},
		{"ConcurrentCommandsOnOneEntity", testConcurrentCommands[T]},
		{"CancelledContextRollsBack", testCancelledContext[T]},
		{"BlockedCommandGivesUpAtItsDeadline", testBlockedCommandDeadline[T]},
		{"UnreachableStoreIsUnavailable", testUnreachable[T]},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			h.check(t)
			c.fn(t, h)
		})
	}
}
