package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/infra/store/storetest"
)

// TestConformance runs the store suite; every case gets its own database.
func TestConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness[*pgstore.Tx] {
		ctx := testCtx(t)
		pool := openPool(t, sandbox.Postgres(t))
		if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); err != nil {
			t.Fatalf("Migrate: %v", err)
		}
		if _, err := pool.Exec(ctx, `CREATE TABLE suite_widgets (id uuid PRIMARY KEY, state text NOT NULL, version bigint NOT NULL)`); err != nil {
			t.Fatal(err)
		}
		s := pgstore.New(pool, nil)
		return storetest.Harness[*pgstore.Tx]{
			Store:   s,
			Widgets: pgWidgets{s},
			Outbox: func(ctx context.Context) ([]storetest.OutboxRow, error) {
				return pgOutbox(ctx, s)
			},
			IsDuplicateVersion: func(err error) bool { return pgstore.IsUniqueViolation(err, historyVersionKey) },
			Unreachable: func(t *testing.T) storetest.Store[*pgstore.Tx] {
				pool := openPool(t, "postgres://postgres@127.0.0.1:1/nothing?sslmode=disable")
				return pgstore.New(pool, nil)
			},
		}
	})
}

type pgWidgets struct{ s *pgstore.Store }

func (w pgWidgets) Insert(ctx context.Context, tx *pgstore.Tx, id string) error {
	_, err := tx.Exec(ctx, `INSERT INTO suite_widgets (id, state, version) VALUES ($1, 'initialized', 0)`, id)
	return err
}

func (w pgWidgets) Load(ctx context.Context, tx *pgstore.Tx, id string) (state string, version int64, err error) {
	err = tx.QueryRow(ctx, `SELECT state, version FROM suite_widgets WHERE id = $1 FOR UPDATE`, id).Scan(&state, &version)
	return state, version, err
}

func (w pgWidgets) Save(ctx context.Context, tx *pgstore.Tx, id, state string, version int64) error {
	tag, err := tx.Exec(ctx, `UPDATE suite_widgets SET state = $2, version = $3 WHERE id = $1`, id, state, version)
	if err == nil && tag.RowsAffected() != 1 {
		err = fmt.Errorf("widget %s not found", id)
	}
	return err
}

func (w pgWidgets) Get(ctx context.Context, id string) (state string, version int64, found bool, err error) {
	err = w.s.Pool().QueryRow(ctx, `SELECT state, version FROM suite_widgets WHERE id = $1`, id).Scan(&state, &version)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", 0, false, nil
	}
	return state, version, err == nil, err
}

// pgOutbox reads watermill_outbox in the relays' order, (xid, offset), and
// unwraps each row's forwarder envelope into the message the relay sends.
func pgOutbox(ctx context.Context, s *pgstore.Store) ([]storetest.OutboxRow, error) {
	rows, err := s.Pool().Query(ctx, `SELECT payload::text FROM watermill_outbox ORDER BY transaction_id, "offset"`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (storetest.OutboxRow, error) {
		var payload []byte
		if err := r.Scan(&payload); err != nil {
			return storetest.OutboxRow{}, err
		}
		var env struct {
			DestinationTopic string            `json:"destination_topic"`
			UUID             string            `json:"uuid"`
			Payload          []byte            `json:"payload"`
			Metadata         map[string]string `json:"metadata"`
		}
		if err := json.Unmarshal(payload, &env); err != nil {
			return storetest.OutboxRow{}, fmt.Errorf("not a forwarder envelope: %w: %s", err, payload)
		}
		return storetest.OutboxRow{RoutingKey: env.DestinationTopic, MessageID: env.UUID, Payload: env.Payload, Metadata: env.Metadata}, nil
	})
}
