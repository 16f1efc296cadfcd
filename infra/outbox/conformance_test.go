package outbox_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/membroker"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/outbox/relaytest"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/infra/sqlitestore"
)

var errAbort = errors.New("abort")

// rabbitExchange declares a topic exchange of the test's own on the local
// RabbitMQ and returns it with a dialer.
func rabbitExchange(t *testing.T) (string, broker.Dialer) {
	t.Helper()
	amqpURL, ns := sandbox.Broker(t)
	exchange := ns + ".events"
	sandbox.DeleteLater(t, nil, []string{exchange})
	dial := broker.AMQPDialer(amqpURL)
	conn, err := dial("relaytest-setup")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	return exchange, dial
}

// The PostgreSQL outbox relayed by PipelinedRelay to RabbitMQ.
func TestPipelinedRelayConformance(t *testing.T) {
	t.Parallel()
	relaytest.Run(t, func(t *testing.T) relaytest.Harness {
		ctx := testCtx(t)
		pool := openPool(t, sandbox.Postgres(t), 8)
		if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); err != nil {
			t.Fatalf("Migrate: %v", err)
		}
		store := pgstore.New(pool, nil)
		exchange, dial := rabbitExchange(t)
		return relaytest.Harness{
			Exchange: exchange,
			Dial:     dial,
			Commit: func(ctx context.Context, events ...*envelope.Event) error {
				return store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error { return tx.Append(ctx, events...) })
			},
			Abort: func(ctx context.Context, events ...*envelope.Event) error {
				return store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
					if err := tx.Append(ctx, events...); err != nil {
						return err
					}
					return errAbort
				})
			},
			NewRelay: func(t *testing.T, dial broker.Dialer) outbox.Relay {
				r, err := outbox.NewPipelinedRelay(outbox.PipelinedConfig{
					Pool: pool, Dial: dial, Exchange: exchange, Topic: pgstore.OutboxTopic,
				})
				if err != nil {
					t.Fatal(err)
				}
				return r
			},
		}
	})
}

// sqliteHarness is the SQLite outbox relayed by SequentialRelay through dial.
func sqliteHarness(t *testing.T, exchange string, dial broker.Dialer) relaytest.Harness {
	t.Helper()
	ctx := testCtx(t)
	db, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: filepath.Join(t.TempDir(), "relay.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	store := sqlitestore.New(db)
	return relaytest.Harness{
		Exchange: exchange,
		Dial:     dial,
		Commit: func(ctx context.Context, events ...*envelope.Event) error {
			return store.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return tx.Append(ctx, events...) })
		},
		Abort: func(ctx context.Context, events ...*envelope.Event) error {
			return store.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error {
				if err := tx.Append(ctx, events...); err != nil {
					return err
				}
				return errAbort
			})
		},
		NewRelay: func(t *testing.T, dial broker.Dialer) outbox.Relay {
			r, err := outbox.NewSequentialRelay(outbox.SequentialConfig{
				Outbox: sqlitestore.NewOutbox(db), Dial: dial, Exchange: exchange,
			})
			if err != nil {
				t.Fatal(err)
			}
			return r
		},
	}
}

// The SQLite outbox relayed by SequentialRelay to RabbitMQ.
func TestSequentialRelayConformanceRabbitMQ(t *testing.T) {
	t.Parallel()
	relaytest.Run(t, func(t *testing.T) relaytest.Harness {
		exchange, dial := rabbitExchange(t)
		return sqliteHarness(t, exchange, dial)
	})
}

// The SQLite outbox relayed by SequentialRelay to the in-process broker:
// the embedded mode.
func TestSequentialRelayConformanceInProcess(t *testing.T) {
	t.Parallel()
	relaytest.Run(t, func(t *testing.T) relaytest.Harness {
		b, err := membroker.New(membroker.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = b.Close() })
		const exchange = "events"
		conn, err := b.Dial("relaytest-setup")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		return sqliteHarness(t, exchange, b.Dialer())
	})
}
