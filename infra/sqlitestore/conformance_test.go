package sqlitestore_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/sqlitestore"
	"github.com/statemill/statemill/infra/store/storetest"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// tempPath is a database file in a directory that does not exist yet, so
// every test also checks that Open creates it.
func tempPath(t testing.TB) string {
	return filepath.Join(t.TempDir(), "var", "nested", "statemill.db")
}

// open opens and migrates a database at path, closed when t ends.
func open(t *testing.T, c sqlitestore.Config) *sqlitestore.DB {
	t.Helper()
	db, err := sqlitestore.Open(testCtx(t), c)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	if err := sqlitestore.Migrate(testCtx(t), db, sqlitestore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if _, err := db.Writer().ExecContext(testCtx(t),
		`CREATE TABLE suite_widgets (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return db
}

func harness(t *testing.T, c sqlitestore.Config) storetest.Harness[*sqlitestore.Tx] {
	db := open(t, c)
	s := sqlitestore.New(db)
	return storetest.Harness[*sqlitestore.Tx]{
		Store:   s,
		Widgets: sqliteWidgets{db},
		Outbox: func(ctx context.Context) ([]storetest.OutboxRow, error) {
			msgs, err := sqlitestore.NewOutbox(db).Read(ctx, 0, 1<<20)
			if err != nil {
				return nil, err
			}
			rows := make([]storetest.OutboxRow, len(msgs))
			for i, m := range msgs {
				msg := m.Message()
				rows[i] = storetest.OutboxRow{RoutingKey: m.RoutingKey, MessageID: msg.UUID, Payload: msg.Payload, Metadata: msg.Metadata}
			}
			return rows, nil
		},
		IsDuplicateVersion: func(err error) bool {
			return sqlitestore.IsUniqueViolation(err, sqlitestore.HistoryVersionKey)
		},
		Unreachable: func(t *testing.T) storetest.Store[*sqlitestore.Tx] {
			db, err := sqlitestore.Open(testCtx(t), sqlitestore.Config{Path: tempPath(t)})
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			return sqlitestore.New(db)
		},
	}
}

func TestConformanceFile(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness[*sqlitestore.Tx] {
		return harness(t, sqlitestore.Config{Path: tempPath(t)})
	})
}

func TestConformanceFileOneConnection(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness[*sqlitestore.Tx] {
		return harness(t, sqlitestore.Config{Path: tempPath(t), OneConnection: true})
	})
}

func TestConformanceMemory(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness[*sqlitestore.Tx] {
		return harness(t, sqlitestore.Config{Path: sqlitestore.Memory})
	})
}

type sqliteWidgets struct{ db *sqlitestore.DB }

func (w sqliteWidgets) Insert(ctx context.Context, tx *sqlitestore.Tx, id string) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO suite_widgets (id, state, version) VALUES (?, 'initialized', 0)`, id)
	return err
}

func (w sqliteWidgets) Load(ctx context.Context, tx *sqlitestore.Tx, id string) (state string, version int64, err error) {
	err = tx.QueryRowContext(ctx, `SELECT state, version FROM suite_widgets WHERE id = ?`, id).Scan(&state, &version)
	return state, version, err
}

func (w sqliteWidgets) Save(ctx context.Context, tx *sqlitestore.Tx, id, state string, version int64) error {
	res, err := tx.ExecContext(ctx, `UPDATE suite_widgets SET state = ?, version = ? WHERE id = ?`, state, version, id)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		return fmt.Errorf("widget %s: %d rows updated, %v", id, n, err)
	}
	return nil
}

func (w sqliteWidgets) Get(ctx context.Context, id string) (state string, version int64, found bool, err error) {
	err = w.db.Reader().QueryRowContext(ctx, `SELECT state, version FROM suite_widgets WHERE id = ?`, id).Scan(&state, &version)
	if errors.Is(err, sql.ErrNoRows) {
		return "", 0, false, nil
	}
	return state, version, err == nil, err
}
