package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// outboxTable is the outbox table pgstore writes, quoted.
var outboxTable = wsql.DefaultPostgreSQLSchema{}.MessagesTable(pgstore.OutboxTopic)

// capture is a message.Publisher that keeps what it is given: behind
// Watermill's forwarder publisher it yields the exact envelope that
// pgstore.Tx.Append hands to the SQL publisher.
type capture struct{ msgs []*message.Message }

func (c *capture) Publish(_ string, msgs ...*message.Message) error {
	c.msgs = append(c.msgs, msgs...)
	return nil
}

func (c *capture) Close() error { return nil }

// outboxRow returns the watermill_outbox row (uuid, payload, metadata) that
// pgstore.Tx.Append writes for e: pgstore.Message, wrapped by the same
// forwarder publisher, serialised as watermill-sql's PostgreSQL schema
// does. Going through the real code keeps the backlog the relay drains in
// the bench identical to one written by commands.
func outboxRow(e envelope.Event) (id string, payload, metadata []byte, err error) {
	msg, err := pgstore.Message(e)
	if err != nil {
		return "", nil, nil, err
	}
	var c capture
	if err := forwarder.NewPublisher(&c, forwarder.PublisherConfig{ForwarderTopic: pgstore.OutboxTopic}).Publish(e.RoutingKey(), msg); err != nil {
		return "", nil, nil, fmt.Errorf("envelope: %w", err)
	}
	if len(c.msgs) != 1 {
		return "", nil, nil, errors.New("envelope: the forwarder published nothing")
	}
	w := c.msgs[0]
	if metadata, err = json.Marshal(w.Metadata); err != nil {
		return "", nil, nil, fmt.Errorf("envelope metadata: %w", err)
	}
	return w.UUID, w.Payload, metadata, nil
}

// adjustEvent is the add_inventory or reduce_inventory event of a product
// that stays in_stock, as the handlers build it.
func adjustEvent(productID, name string, inventory, version, sequence int64, delta int64) (envelope.Event, error) {
	attrs, err := json.Marshal(events.ProductAttributes{ID: productID, Name: name, Price: 100, Inventory: inventory, State: events.InStock})
	if err != nil {
		return envelope.Event{}, fmt.Errorf("attributes: %w", err)
	}
	ev := events.AddInventory
	if delta < 0 {
		ev = events.ReduceInventory
	}
	return envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		Sequence:      sequence,
		EntityType:    events.EntityType,
		EntityID:      productID,
		Version:       version,
		Event:         ev,
		From:          events.InStock,
		To:            events.InStock,
		Attributes:    attrs,
		OccurredAt:    time.Now().UTC().Truncate(time.Microsecond),
		CorrelationID: uuid.NewString(),
	}, nil
}

// writeBacklog writes n outbox rows, perTx per transaction (a real backlog
// comes from many transactions: the relay reads it in xid order), as
// add_inventory events of a few hundred made-up products.
func writeBacklog(ctx context.Context, pool *pgxpool.Pool, n, perTx int) error {
	const products = 500
	ids := make([]string, products)
	for i := range ids {
		ids[i] = uuid.Must(uuid.NewV7()).String()
	}
	versions := make([]int64, products)
	for done := 0; done < n; {
		k := min(perTx, n-done)
		uuids, payloads, metas := make([]string, k), make([]string, k), make([]string, k)
		for i := range k {
			p := (done + i) % products
			versions[p]++
			e, err := adjustEvent(ids[p], fmt.Sprintf("backlog-%d", p), versions[p], versions[p], int64(done+i+1), 1)
			if err != nil {
				return err
			}
			id, payload, meta, err := outboxRow(e)
			if err != nil {
				return err
			}
			uuids[i], payloads[i], metas[i] = id, string(payload), string(meta)
		}
		_, err := pool.Exec(ctx, `
			INSERT INTO `+outboxTable+` (uuid, payload, metadata, transaction_id)
			SELECT u, p::json, m::json, pg_current_xact_id() FROM unnest($1::text[], $2::text[], $3::text[]) AS t(u, p, m)`,
			uuids, payloads, metas)
		if err != nil {
			return fmt.Errorf("write backlog: %w", err)
		}
		done += k
	}
	return nil
}
