// Package pgstore is statemill's PostgreSQL store: the connection pool, the
// embedded migrations, the append-only history, and the transactional outbox.
// A command's entity change, its history rows and its outbox messages commit
// in one pgx transaction or not at all.
package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/store"
)

// OutboxTopic is the watermill-sql topic (table watermill_outbox) that holds
// events until the relay publishes them.
const OutboxTopic = "outbox"

// PoolConfig tunes the connection pool.
type PoolConfig struct {
	URL            string
	MaxConns       int32         // default 16
	ConnectTimeout time.Duration // default 2s: a command answers 503 quickly when PostgreSQL is down
}

// Validate reports a missing URL.
func (c PoolConfig) Validate() error {
	if c.URL == "" {
		return errors.New("pgstore: database URL is empty")
	}
	return nil
}

// Open connects a pool. It does not wait for the database to be reachable:
// a service starts and reports 503 until PostgreSQL answers.
func Open(ctx context.Context, c PoolConfig) (*pgxpool.Pool, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	cfg, err := pgxpool.ParseConfig(c.URL)
	if err != nil {
		return nil, fmt.Errorf("pgstore: parse database URL: %w", err)
	}
	cfg.MaxConns = 16
	if c.MaxConns > 0 {
		cfg.MaxConns = c.MaxConns
	}
	cfg.ConnConfig.ConnectTimeout = 2 * time.Second
	if c.ConnectTimeout > 0 {
		cfg.ConnConfig.ConnectTimeout = c.ConnectTimeout
	}
	cfg.HealthCheckPeriod = 5 * time.Second
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: open pool: %w", err)
	}
	return pool, nil
}

// Store runs transactions that record transitions.
type Store struct {
	pool   *pgxpool.Pool
	logger watermill.LoggerAdapter
}

// New returns a Store over pool.
func New(pool *pgxpool.Pool, logger watermill.LoggerAdapter) *Store {
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	return &Store{pool: pool, logger: logger}
}

// Pool is the underlying pool, for queries outside a command.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Tx is one command's transaction: the domain reads and writes its own tables
// through the embedded pgx.Tx and records transitions with Append.
type Tx struct {
	pgx.Tx
	outbox message.Publisher
}

// InTx runs fn in one transaction and commits it when fn returns nil. The
// first statement fn runs on an existing entity should be LockEntity, then
// its SELECT ... FOR UPDATE: xid order then follows lock order per entity.
// Connection failures come back as apperr.Unavailable.
func (s *Store) InTx(ctx context.Context, fn func(ctx context.Context, tx *Tx) error) error {
	pgtx, err := s.pool.Begin(ctx)
	if err != nil {
		return Classify(fmt.Errorf("begin: %w", err))
	}
	defer pgtx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit this is a no-op

	sqlPub, err := wsql.NewPublisher(wsql.TxFromPgx(pgtx), wsql.PublisherConfig{SchemaAdapter: wsql.DefaultPostgreSQLSchema{}}, s.logger)
	if err != nil {
		return fmt.Errorf("outbox publisher: %w", err)
	}
	tx := &Tx{Tx: pgtx, outbox: forwarder.NewPublisher(sqlPub, forwarder.PublisherConfig{ForwarderTopic: OutboxTopic})}
	if err := fn(ctx, tx); err != nil {
		return Classify(err)
	}
	if err := pgtx.Commit(ctx); err != nil {
		return Classify(fmt.Errorf("commit: %w", err))
	}
	return nil
}

// LockEntity serialises the transactions of one entity on a transaction-level
// advisory lock; call it first, before the SELECT ... FOR UPDATE of the row.
// Waiting for an advisory lock takes no xid, so the xids of an entity's
// transactions follow their lock order, and so does the relay (which
// publishes in xid order). SELECT ... FOR UPDATE alone does not ensure this:
// a waiter whose row was updated meanwhile takes its xid when the holder
// commits, then follows the update chain and can wait again behind a newer
// transaction that locked the new row version first.
func (tx *Tx) LockEntity(ctx context.Context, entityType, entityID string) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))`, entityType, entityID); err != nil {
		return fmt.Errorf("lock %s %s: %w", entityType, entityID, err)
	}
	return nil
}

// Append records events in order: one history row and one outbox message
// each, in this transaction. It fills in each event's Sequence and brings its
// OccurredAt to UTC at PostgreSQL's microsecond precision, so the published
// event and the stored one (which a replay sends) carry the same value.
func (tx *Tx) Append(ctx context.Context, events ...*envelope.Event) error {
	for _, e := range events {
		e.OccurredAt = e.OccurredAt.UTC().Truncate(time.Microsecond)
		err := tx.QueryRow(ctx, `
			INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
			                     attributes, correlation_id, occurred_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
			RETURNING sequence`,
			e.ID, e.EntityType, e.EntityID, e.Version, e.Event, e.From, e.To,
			e.Attributes, e.CorrelationID, e.OccurredAt,
		).Scan(&e.Sequence)
		if err != nil {
			return fmt.Errorf("append history: %w", err)
		}
		msg, err := Message(*e)
		if err != nil {
			return err
		}
		msg.SetContext(ctx)
		if err := tx.outbox.Publish(e.RoutingKey(), msg); err != nil {
			return fmt.Errorf("write outbox: %w", err)
		}
	}
	return nil
}

// Message is the Watermill message of an event: its id is the event id (the
// AMQP message_id), its payload the event JSON.
func Message(e envelope.Event) (*message.Message, error) {
	body, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("marshal event: %w", err)
	}
	msg := message.NewMessage(e.ID, body)
	msg.Metadata.Set(envelope.HeaderCorrelationID, e.CorrelationID)
	msg.Metadata.Set(envelope.HeaderSchemaVersion, strconv.Itoa(e.SchemaVersion))
	return msg, nil
}

// History returns an entity's transitions in order.
func (s *Store) History(ctx context.Context, entityType, entityID string) ([]envelope.Event, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT event_id, sequence, entity_type, entity_id, version, event, from_state, to_state,
		       attributes, occurred_at, correlation_id
		FROM history WHERE entity_type = $1 AND entity_id = $2 ORDER BY version`, entityType, entityID)
	if err != nil {
		return nil, Classify(fmt.Errorf("history: %w", err))
	}
	events, err := pgx.CollectRows(rows, ScanEvent)
	if err != nil {
		return nil, Classify(fmt.Errorf("history: %w", err))
	}
	return events, nil
}

// ScanEvent scans a history row selected in the column order of History.
func ScanEvent(row pgx.CollectableRow) (envelope.Event, error) {
	var e envelope.Event
	err := row.Scan(&e.ID, &e.Sequence, &e.EntityType, &e.EntityID, &e.Version, &e.Event, &e.From, &e.To,
		&e.Attributes, &e.OccurredAt, &e.CorrelationID)
	e.SchemaVersion = envelope.SchemaVersion
	e.OccurredAt = e.OccurredAt.UTC()
	return e, err
}

var _ store.Store[*Tx] = (*Store)(nil)
