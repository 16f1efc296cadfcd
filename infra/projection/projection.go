// Package projection is statemill's projection runtime: a worker named N
// consumes its durable queues N.live (bound to `<entity>.#`) and N.replay
// (bound to `N.<entity>.#`), hands events in batches to a Projection inside
// a read-model transaction that also records progress, dead-letters poison
// to N.dead, retries transient failures, and rebuilds the read model without
// downtime from a replay routed only to it (DESIGN §7).
//
// A read model is kept in generations: the live model is the active
// generation; a rebuild fills a shadow generation from a replay while live
// events go to both, then swaps by making the shadow active in one
// transaction. Readers filter on the active generation (ActiveGenerationSQL).
//
// Wiring: NewWorker(Config) then Run(ctx) in a goroutine; Ready tells when it
// consumes; Rebuild and CatchUp start a replay and return at once; Status
// reports progress, lag and rebuild state. The runtime keeps its state in
// the tables StateTable and ProgressTable of Config.Schema, which it creates.
package projection

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/statemill/statemill/infra/envelope"
)

// Projection is a read model. The runtime owns transactions, batching,
// acknowledgements, generations and progress; the projection only writes.
type Projection interface {
	// Apply writes events into generation gen of the read model, inside tx.
	// It must be idempotent and order-tolerant: an event whose version is
	// not newer than what gen holds for its entity changes nothing (upsert
	// ... WHERE version < EXCLUDED.version). events may hold several events
	// of one entity and events of several entity types. An error marks the
	// whole batch failed; the runtime retries transient errors and isolates
	// a poison event by applying the batch one event at a time.
	//
	// The runtime hands over each event id once per call, sorted by entity
	// type, entity id and version; writing rows in that order keeps
	// concurrent batches (live and replay, during a rebuild) from
	// deadlocking. A transient error is one where PostgreSQL is unreachable,
	// or asks for a retry (deadlock, serialization failure), or an error
	// carrying apperr.Unavailable: the batch stays unacknowledged and is
	// retried with backoff, never dead-lettered. Any other error is
	// permanent: the events it is narrowed down to go to N.dead.
	Apply(ctx context.Context, tx pgx.Tx, gen int64, events []envelope.Event) error
	// Clear deletes every row of generation gen (an old generation after a
	// swap, or a shadow that was abandoned).
	Clear(ctx context.Context, tx pgx.Tx, gen int64) error
}

// RebuildState is where a rebuild is.
type RebuildState string

const (
	RebuildIdle      RebuildState = "idle"      // never rebuilt
	RebuildRunning   RebuildState = "running"   // shadow being filled
	RebuildCompleted RebuildState = "completed" // last rebuild swapped in
	RebuildFailed    RebuildState = "failed"    // last rebuild gave up; the live model was kept
)

// Status is what GET /<name>/status reports.
type Status struct {
	Name             string    `json:"name"`
	ActiveGeneration int64     `json:"active_generation"`
	Applied          int64     `json:"applied"`       // events applied to the active model since it became active (live + replayed)
	LagMessages      int64     `json:"lag_messages"`  // messages ready in N.live
	LagSeconds       float64   `json:"lag_seconds"`   // age of the oldest event received but not yet applied; 0 when none
	LastEventAt      time.Time `json:"last_event_at"` // occurred_at of the newest applied event
	DeadLettered     int64     `json:"dead_lettered"` // messages this process sent to N.dead
	// Cursor is the replay cursor the active model is complete up to, when
	// the worker consumes one entity type; Cursors has it per entity type.
	Cursor  string            `json:"cursor,omitempty"`
	Cursors map[string]string `json:"cursors,omitempty"`
	// Connected reports whether this process is connected to the broker and
	// consuming N.live. LagMessages is -1 while it is not.
	Connected bool    `json:"connected"`
	Rebuild   Rebuild `json:"rebuild"`
	// CatchUp is the current or last incremental catch-up of this process
	// (nil when there was none); its ShadowGeneration is always 0.
	CatchUp *Rebuild `json:"catch_up,omitempty"`
}

// Rebuild is the state and progress of the current or last rebuild.
type Rebuild struct {
	State            RebuildState `json:"state"`
	ReplayID         string       `json:"replay_id,omitempty"`  // of the first entity type
	ReplayIDs        []string     `json:"replay_ids,omitempty"` // one replay per entity type, in Config.EntityTypes order
	ShadowGeneration int64        `json:"shadow_generation,omitempty"`
	Expected         int64        `json:"expected"` // expected_count, then the completed marker's count
	Received         int64        `json:"received"` // distinct events of this replay applied to the shadow
	StartedAt        *time.Time   `json:"started_at,omitempty"`
	FinishedAt       *time.Time   `json:"finished_at,omitempty"`
	Error            string       `json:"error,omitempty"`
}
