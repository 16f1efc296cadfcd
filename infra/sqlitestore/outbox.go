package sqlitestore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/statemill/statemill/infra/envelope"
)

// pruneChunk bounds one DELETE, so pruning never holds the write lock (and
// so every command) for long.
const pruneChunk = 5000

// OutboxMessage is one outbox row: an event as it goes on the wire.
type OutboxMessage struct {
	// Offset orders the outbox; offset order is commit order.
	Offset        int64
	EventID       string // the AMQP message_id
	RoutingKey    string // <entity_type>.<event>
	Payload       []byte // the event JSON (envelope.Event)
	CorrelationID string
	SchemaVersion int
	CreatedAt     time.Time
}

// Message is the Watermill message to publish under RoutingKey: its id is
// the event id, its payload the event JSON, its metadata the correlation id
// and schema version headers, as pgstore.Message builds them.
func (m OutboxMessage) Message() *message.Message {
	msg := message.NewMessage(m.EventID, m.Payload)
	msg.Metadata.Set(envelope.HeaderCorrelationID, m.CorrelationID)
	msg.Metadata.Set(envelope.HeaderSchemaVersion, strconv.Itoa(m.SchemaVersion))
	return msg
}

// Outbox is what a relay needs of the outbox: read in commit order after an
// offset, remember how far it published (per consumer group), count what
// is left, prune what every group published, and wake up on new rows
// instead of polling.
type Outbox struct {
	db *DB
}

// NewOutbox returns the outbox reader of db.
func NewOutbox(db *DB) *Outbox { return &Outbox{db: db} }

// Wakeup returns a channel closed after the next commit that appends
// events through a Store on the same DB (or when the DB closes). Take it
// before reading, then wait on it only if the read found nothing: a commit
// in between has closed it already. Writers in other processes do not wake
// it: a relay sharing a file across processes also polls, slowly.
func (o *Outbox) Wakeup() <-chan struct{} { return o.db.wake.wait() }

// Read returns up to limit rows after offset, in commit order. Rows are
// visible only once committed, and none can later commit below one that is
// visible, so a relay may keep a plain offset as its watermark.
func (o *Outbox) Read(ctx context.Context, after int64, limit int) ([]OutboxMessage, error) {
	if limit <= 0 {
		return nil, errors.New("sqlitestore: outbox read limit must be positive")
	}
	rows, err := o.db.reader.QueryContext(ctx, `
		SELECT "offset", event_id, routing_key, payload, correlation_id, schema_version, created_at
		FROM outbox WHERE "offset" > ? ORDER BY "offset" LIMIT ?`, after, limit)
	if err != nil {
		return nil, Classify(fmt.Errorf("outbox: read: %w", err))
	}
	defer rows.Close()
	var out []OutboxMessage
	for rows.Next() {
		var m OutboxMessage
		var payload, created string
		if err := rows.Scan(&m.Offset, &m.EventID, &m.RoutingKey, &payload, &m.CorrelationID, &m.SchemaVersion, &created); err != nil {
			return nil, Classify(fmt.Errorf("outbox: read: %w", err))
		}
		m.Payload = []byte(payload)
		if m.CreatedAt, err = time.Parse(time.RFC3339Nano, created); err != nil {
			return nil, fmt.Errorf("outbox: created_at %q: %w", created, err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, Classify(fmt.Errorf("outbox: read: %w", err))
	}
	return out, nil
}

// Offset is the last offset group acknowledged, 0 before its first Ack.
func (o *Outbox) Offset(ctx context.Context, group string) (int64, error) {
	var off int64
	err := o.db.reader.QueryRowContext(ctx, `
		SELECT COALESCE((SELECT offset_acked FROM outbox_offsets WHERE consumer_group = ?), 0)`, group).Scan(&off)
	if err != nil {
		return 0, Classify(fmt.Errorf("outbox: offset of %s: %w", group, err))
	}
	return off, nil
}

// Ack records that group published every row up to offset. The offset
// never moves back, so a relay that re-reads after a restart cannot undo a
// newer acknowledgement.
func (o *Outbox) Ack(ctx context.Context, group string, offset int64) error {
	_, err := o.db.writer.ExecContext(ctx, `
		INSERT INTO outbox_offsets (consumer_group, offset_acked) VALUES (?, ?)
		ON CONFLICT (consumer_group) DO UPDATE
		SET offset_acked = max(offset_acked, excluded.offset_acked),
		    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')`, group, offset)
	if err != nil {
		return Classify(fmt.Errorf("outbox: ack %s at %d: %w", group, offset, err))
	}
	return nil
}

// Pending counts the committed rows group has not acknowledged.
func (o *Outbox) Pending(ctx context.Context, group string) (int64, error) {
	var n int64
	err := o.db.reader.QueryRowContext(ctx, `
		SELECT count(*) FROM outbox
		WHERE "offset" > COALESCE((SELECT offset_acked FROM outbox_offsets WHERE consumer_group = ?), 0)`, group).Scan(&n)
	if err != nil {
		return 0, Classify(fmt.Errorf("outbox: pending: %w", err))
	}
	return n, nil
}

// Prune deletes rows every consumer group has acknowledged and that are
// older than retention (kept meanwhile for inspection), in chunks. Without
// any group nothing counts as published and nothing is deleted.
func (o *Outbox) Prune(ctx context.Context, retention time.Duration) (int64, error) {
	if retention < 0 {
		return 0, errors.New("sqlitestore: prune retention must not be negative")
	}
	var total int64
	for {
		res, err := o.db.writer.ExecContext(ctx, `
			DELETE FROM outbox WHERE "offset" IN (
				SELECT "offset" FROM outbox
				WHERE "offset" <= (SELECT min(offset_acked) FROM outbox_offsets)
				  AND created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)
				ORDER BY "offset" LIMIT ?)`, secondsAgo(retention), pruneChunk)
		if err != nil {
			return total, Classify(fmt.Errorf("outbox: prune: %w", err))
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, fmt.Errorf("outbox: prune: %w", err)
		}
		total += n
		if n < pruneChunk {
			return total, nil
		}
	}
}
