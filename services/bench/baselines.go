package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/events"
)

// B1: the raw PostgreSQL baseline. One transaction runs the statements one
// adjust_inventory command runs (handlers.Repository.Update and
// pgstore.Tx.Append), on the real schema, with pgx straight from the bench:
// the advisory entity lock, SELECT ... FOR UPDATE, UPDATE products, INSERT
// history, INSERT the outbox envelope with pg_current_xact_id(), COMMIT.
// What the framework adds on top (HTTP, the command bus, the state machine,
// Watermill's SQL publisher) is what S1 / B1 shows.
func (b *bench) baselinePostgres(ctx context.Context) error {
	b.logf("B1: PostgreSQL command-shaped transactions")
	db, err := b.e.createDB(ctx, "b1")
	if err != nil {
		return err
	}
	maxClients := b.plan.Clients
	pool, err := openMigrated(ctx, db, int32(maxClients))
	if err != nil {
		return fmt.Errorf("B1: %w", err)
	}
	defer pool.Close()
	rows, err := pool.Query(ctx, `
		INSERT INTO products (id, name, price, inventory, state, version, created_at, updated_at)
		SELECT gen_random_uuid(), 'b1-' || i, 100, 1000000, 'in_stock', 2, now(), now()
		FROM generate_series(1, $1) i RETURNING id::text`, b.plan.Products)
	if err != nil {
		return fmt.Errorf("B1: seed products: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("B1: seed products: %w", err)
	}

	configs := []int{1, maxClients}
	if _, err := b1Run(ctx, pool, ids, maxClients, b.plan.BaselineWarmup); err != nil {
		return fmt.Errorf("B1 warm-up: %w", err)
	}
	reps := make(map[int][]float64)
	for rep := range b.plan.Reps {
		// Interleaved, so a noisy moment of the machine spreads over both.
		for _, c := range configs {
			tps, err := b1Run(ctx, pool, ids, c, b.plan.BaselineDuration)
			if err != nil {
				return fmt.Errorf("B1 %d clients: %w", c, err)
			}
			b.logf("  B1 %d client(s) rep %d: %.0f tx/s", c, rep+1, tps)
			reps[c] = append(reps[c], tps)
		}
	}
	b.res.add(
		newFigure("b1_pg_command_tx_1_client", "tx/s", "raw pgx transaction shaped like one adjust_inventory command (advisory lock, SELECT FOR UPDATE, UPDATE, INSERT history, INSERT outbox), 1 client", reps[1]),
		newFigure(fmt.Sprintf("b1_pg_command_tx_%d_clients", maxClients), "tx/s", fmt.Sprintf("the same, %d concurrent clients", maxClients), reps[maxClients]),
	)
	return nil
}

// b1Run runs command-shaped transactions from clients goroutines for d and
// returns the committed transactions per second.
func b1Run(ctx context.Context, pool *pgxpool.Pool, ids []string, clients int, d time.Duration) (float64, error) {
	var done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	start := time.Now()
	deadline := start.Add(d)
	for range clients {
		g.Go(func() error {
			for time.Now().Before(deadline) {
				if err := b1Tx(gctx, pool, ids[rand.IntN(len(ids))], randomDelta()); err != nil {
					return err
				}
				done.Add(1)
			}
			return nil
		})
	}
	err := g.Wait()
	return float64(done.Load()) / time.Since(start).Seconds(), err
}

// randomDelta is +1 or -1: inventories start at a million, so a random walk
// never reaches zero and every command is accepted.
func randomDelta() int64 {
	if rand.IntN(2) == 0 {
		return -1
	}
	return 1
}

// b1Tx is one adjust_inventory's transaction, statement for statement.
func b1Tx(ctx context.Context, pool *pgxpool.Pool, id string, delta int64) error {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))`, events.EntityType, id); err != nil {
		return fmt.Errorf("lock: %w", err)
	}
	var (
		name, state          string
		price, inv, version  int64
		createdAt, updatedAt time.Time
	)
	err = tx.QueryRow(ctx, `SELECT id, name, price, inventory, state, version, created_at, updated_at FROM products WHERE id = $1 FOR UPDATE`, id).
		Scan(&id, &name, &price, &inv, &state, &version, &createdAt, &updatedAt)
	if err != nil {
		return fmt.Errorf("select: %w", err)
	}
	inv += delta
	version++
	e, err := adjustEvent(id, name, inv, version, 0, delta)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE products SET name = $2, price = $3, inventory = $4, state = $5, version = $6, updated_at = $7 WHERE id = $1`,
		id, name, price, inv, state, version, e.OccurredAt); err != nil {
		return fmt.Errorf("update: %w", err)
	}
	err = tx.QueryRow(ctx, `
		INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
		                     attributes, correlation_id, occurred_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
		RETURNING sequence`,
		e.ID, e.EntityType, e.EntityID, e.Version, e.Event, e.From, e.To, e.Attributes, e.CorrelationID, e.OccurredAt,
	).Scan(&e.Sequence)
	if err != nil {
		return fmt.Errorf("insert history: %w", err)
	}
	uid, payload, meta, err := outboxRow(e)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO `+outboxTable+` (uuid, payload, metadata, transaction_id) VALUES ($1, $2, $3, pg_current_xact_id())`,
		uid, payload, meta); err != nil {
		return fmt.Errorf("insert outbox: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// B2: the raw RabbitMQ baseline. amqp091-go publishes persistent 256-byte
// messages to a durable classic queue with publisher confirms, keeping 1 or
// 100 unconfirmed; the rate counts confirmed messages.
func (b *bench) baselineRabbitMQ(ctx context.Context) error {
	b.logf("B2: RabbitMQ persistent publishes with confirms")
	queue := b.e.name("b2")
	b.e.deleteLater([]string{queue}, nil)
	conn, err := amqp091.DialConfig(b.e.amqpURL, amqp091.Config{
		Dial:       amqp091.DefaultDial(5 * time.Second),
		Properties: amqp091.Table{"connection_name": "statemill bench B2"},
	})
	if err != nil {
		return fmt.Errorf("B2: connect: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("B2: channel: %w", err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp091.Table{"x-queue-type": "classic"}); err != nil {
		return fmt.Errorf("B2: declare %s: %w", queue, err)
	}

	configs := []int{1, 100}
	if _, err := b2Run(ctx, conn, queue, 100, b.plan.BaselineWarmup); err != nil {
		return fmt.Errorf("B2 warm-up: %w", err)
	}
	reps := map[int][]float64{}
	for rep := range b.plan.Reps {
		for _, inflight := range configs {
			rate, err := b2Run(ctx, conn, queue, inflight, b.plan.BaselineDuration)
			if err != nil {
				return fmt.Errorf("B2 in-flight %d: %w", inflight, err)
			}
			b.logf("  B2 in-flight %d rep %d: %.0f msg/s", inflight, rep+1, rate)
			reps[inflight] = append(reps[inflight], rate)
		}
	}
	b.res.add(
		newFigure("b2_amqp_publish_inflight_1", "msg/s", "raw amqp091-go persistent 256 B publishes to a durable classic queue, confirms, 1 unconfirmed at a time", reps[1]),
		newFigure("b2_amqp_publish_inflight_100", "msg/s", "the same, up to 100 unconfirmed", reps[100]),
	)
	return nil
}

// b2Run publishes for d with at most inflight unconfirmed messages and
// returns the confirmed messages per second. The queue is purged after, so
// each run starts from an empty queue.
func b2Run(ctx context.Context, conn *amqp091.Connection, queue string, inflight int, d time.Duration) (float64, error) {
	ch, err := conn.Channel()
	if err != nil {
		return 0, fmt.Errorf("channel: %w", err)
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return 0, fmt.Errorf("confirm mode: %w", err)
	}
	body := make([]byte, 256)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	pending := make([]*amqp091.DeferredConfirmation, 0, inflight)
	confirmed := 0
	waitOldest := func() error {
		dc := pending[0]
		pending = pending[1:]
		ok, err := dc.WaitContext(ctx)
		if err != nil {
			return fmt.Errorf("wait for confirm: %w", err)
		}
		if !ok {
			return errors.New("the broker nacked a message")
		}
		confirmed++
		return nil
	}
	start := time.Now()
	for time.Since(start) < d {
		if len(pending) == inflight {
			if err := waitOldest(); err != nil {
				return 0, err
			}
		}
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, false, false, amqp091.Publishing{
			DeliveryMode: amqp091.Persistent,
			ContentType:  "application/octet-stream",
			Body:         body,
		})
		if err != nil {
			return 0, fmt.Errorf("publish: %w", err)
		}
		pending = append(pending, dc)
	}
	for len(pending) > 0 {
		if err := waitOldest(); err != nil {
			return 0, err
		}
	}
	rate := float64(confirmed) / time.Since(start).Seconds()
	if _, err := ch.QueuePurge(queue, false); err != nil {
		return 0, fmt.Errorf("purge: %w", err)
	}
	return rate, nil
}
