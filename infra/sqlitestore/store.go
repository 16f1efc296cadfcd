package sqlitestore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/store"
)

// timeLayout is how times are stored: UTC, fixed width, microseconds (the
// precision pgstore keeps), so text order is time order.
const timeLayout = "2006-01-02T15:04:05.000000Z"

// Store runs transactions that record transitions.
type Store struct {
	db *DB
}

// New returns a Store over db, which must be migrated with Framework().
func New(db *DB) *Store { return &Store{db: db} }

// DB is the underlying database, for queries outside a command.
func (s *Store) DB() *DB { return s.db }

// Tx is one command's transaction: the domain reads and writes its own
// tables through the embedded *sql.Tx and records transitions with Append.
type Tx struct {
	*sql.Tx
	appended bool // wake relays after the commit
}

// InTx runs fn in one transaction on the writer and commits it when fn
// returns nil. The transaction begins IMMEDIATE, so it holds the write lock
// from its first statement: reads in fn see the latest commit and nothing
// commits in between. Waiting for the writer is bounded by ctx; a database
// that cannot serve yields apperr.Unavailable. After a commit that appended
// events, relays waiting on Outbox.Wakeup wake.
//
// With one connection (a Memory database, Config.OneConnection) fn must
// not call the Store's other methods: the transaction holds the connection
// they would wait for.
func (s *Store) InTx(ctx context.Context, fn func(ctx context.Context, tx *Tx) error) error {
	sqlTx, err := s.db.writer.BeginTx(ctx, nil)
	if err != nil {
		return Classify(fmt.Errorf("begin: %w", err))
	}
	defer sqlTx.Rollback() //nolint:errcheck // after Commit this is a no-op
	tx := &Tx{Tx: sqlTx}
	if err := fn(ctx, tx); err != nil {
		return Classify(err)
	}
	// A command whose caller gave up must not commit behind its back
	// (database/sql's Commit checks too; this does not rely on it).
	if err := ctx.Err(); err != nil {
		return Classify(fmt.Errorf("commit: %w", err))
	}
	if err := sqlTx.Commit(); err != nil {
		return Classify(fmt.Errorf("commit: %w", err))
	}
	if tx.appended {
		s.db.wake.notify()
	}
	return nil
}

// LockEntity is a no-op that checks ctx: InTx's transaction began
// IMMEDIATE on the single writer and holds the database's write lock, which
// already serialises every command (on any entity) in commit order, and so
// in outbox order. A per-entity lock could add nothing but waiting.
func (tx *Tx) LockEntity(ctx context.Context, _, _ string) error {
	return ctx.Err()
}

// Append records events in order: one history row and one outbox row each,
// in this transaction. It fills in each event's Sequence and brings its
// OccurredAt to UTC at microsecond precision (as pgstore does), so the
// published event and the stored one (which a replay sends) carry the same
// value.
func (tx *Tx) Append(ctx context.Context, events ...*envelope.Event) error {
	for _, e := range events {
		e.OccurredAt = e.OccurredAt.UTC().Truncate(time.Microsecond)
		err := tx.QueryRowContext(ctx, `
			INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
			                     attributes, correlation_id, occurred_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
			RETURNING sequence`,
			e.ID, e.EntityType, e.EntityID, e.Version, e.Event, e.From, e.To,
			string(e.Attributes), e.CorrelationID, e.OccurredAt.Format(timeLayout),
		).Scan(&e.Sequence)
		if err != nil {
			return fmt.Errorf("append history: %w", err)
		}
		body, err := json.Marshal(e)
		if err != nil {
			return fmt.Errorf("marshal event: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `
			INSERT INTO outbox (event_id, routing_key, payload, correlation_id, schema_version)
			VALUES (?, ?, ?, ?, ?)`,
			e.ID, e.RoutingKey(), string(body), e.CorrelationID, e.SchemaVersion); err != nil {
			return fmt.Errorf("write outbox: %w", err)
		}
		tx.appended = true
	}
	return nil
}

// historyColumns is the column order scanEvent reads.
const historyColumns = `event_id, sequence, entity_type, entity_id, version, event, from_state, to_state,
	attributes, occurred_at, correlation_id`

// History returns an entity's transitions in version order.
func (s *Store) History(ctx context.Context, entityType, entityID string) ([]envelope.Event, error) {
	rows, err := s.db.reader.QueryContext(ctx, `SELECT `+historyColumns+`
		FROM history WHERE entity_type = ? AND entity_id = ? ORDER BY version`, entityType, entityID)
	if err != nil {
		return nil, Classify(fmt.Errorf("history: %w", err))
	}
	defer rows.Close()
	events := []envelope.Event{}
	for rows.Next() {
		e, err := ScanEvent(rows)
		if err != nil {
			return nil, Classify(fmt.Errorf("history: %w", err))
		}
		events = append(events, e)
	}
	if err := rows.Err(); err != nil {
		return nil, Classify(fmt.Errorf("history: %w", err))
	}
	return events, nil
}

// Scanner is what ScanEvent reads from: *sql.Row or *sql.Rows.
type Scanner interface {
	Scan(dest ...any) error
}

// ScanEvent scans a history row selected in the column order of History
// (event_id, sequence, entity_type, entity_id, version, event, from_state,
// to_state, attributes, occurred_at, correlation_id).
func ScanEvent(row Scanner) (envelope.Event, error) {
	var e envelope.Event
	var attributes, occurredAt string
	if err := row.Scan(&e.ID, &e.Sequence, &e.EntityType, &e.EntityID, &e.Version, &e.Event, &e.From, &e.To,
		&attributes, &occurredAt, &e.CorrelationID); err != nil {
		return envelope.Event{}, err
	}
	t, err := time.Parse(time.RFC3339Nano, occurredAt)
	if err != nil {
		return envelope.Event{}, fmt.Errorf("occurred_at %q: %w", occurredAt, err)
	}
	e.Attributes = json.RawMessage(attributes)
	e.OccurredAt = t.UTC()
	e.SchemaVersion = envelope.SchemaVersion
	return e, nil
}

// Recall returns the outcome a committed command recorded under key. In the
// command's transaction no other lock is needed: the transaction holds the
// database's write lock, so commands with the same key already take turns.
func (tx *Tx) Recall(ctx context.Context, key string) (store.Outcome, bool, error) {
	return recall(ctx, tx.Tx, key)
}

// Remember records the outcome of this transaction's command under key; it
// commits with the command or not at all. A key already recorded is a
// unique violation.
func (tx *Tx) Remember(ctx context.Context, key string, o store.Outcome) error {
	if _, err := tx.ExecContext(ctx, `INSERT INTO idempotency_keys (key, fingerprint, response) VALUES (?, ?, ?)`,
		key, o.Fingerprint, string(o.Response)); err != nil {
		return fmt.Errorf("remember idempotency key: %w", err)
	}
	return nil
}

// Recall returns the outcome recorded under key outside a command, for a
// fast answer to a retry.
func (s *Store) Recall(ctx context.Context, key string) (store.Outcome, bool, error) {
	o, found, err := recall(ctx, s.db.reader, key)
	return o, found, Classify(err)
}

type queryRower interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func recall(ctx context.Context, q queryRower, key string) (store.Outcome, bool, error) {
	var o store.Outcome
	var response string
	err := q.QueryRowContext(ctx, `SELECT fingerprint, response FROM idempotency_keys WHERE key = ?`, key).
		Scan(&o.Fingerprint, &response)
	if errors.Is(err, sql.ErrNoRows) {
		return store.Outcome{}, false, nil
	}
	if err != nil {
		return store.Outcome{}, false, fmt.Errorf("recall idempotency key: %w", err)
	}
	o.Response = json.RawMessage(response)
	return o, true, nil
}

// ForgetOutcomes deletes outcomes recorded before now-age: a retry later
// than that runs as a new request.
func (s *Store) ForgetOutcomes(ctx context.Context, age time.Duration) (int64, error) {
	res, err := s.db.writer.ExecContext(ctx,
		`DELETE FROM idempotency_keys WHERE created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)`, secondsAgo(age))
	if err != nil {
		return 0, Classify(fmt.Errorf("forget idempotency keys: %w", err))
	}
	return res.RowsAffected()
}

// secondsAgo is the SQLite date modifier that goes back d.
func secondsAgo(d time.Duration) string {
	return "-" + strconv.FormatFloat(d.Seconds(), 'f', 3, 64) + " seconds"
}

var (
	_ store.Store[*Tx] = (*Store)(nil)
	_ store.Recaller   = (*Store)(nil)
	_ store.Idempotent = (*Tx)(nil)
	_ store.Locker     = (*Tx)(nil)
)
