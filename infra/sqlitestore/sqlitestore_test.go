package sqlitestore_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sqlitestore"
	"github.com/statemill/statemill/infra/store"
)

func widgetEvent(id string, version int64, from, to string) *envelope.Event {
	return &envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		EntityType:    "widget",
		EntityID:      id,
		Version:       version,
		Event:         "step",
		From:          from,
		To:            to,
		Attributes:    json.RawMessage(fmt.Sprintf(`{"id":%q,"state":%q}`, id, to)),
		OccurredAt:    time.Now(),
		CorrelationID: "corr",
	}
}

// step is a command on widget id: read its version, write the next one
// with its event.
func step(ctx context.Context, tx *sqlitestore.Tx, id string) error {
	if err := tx.LockEntity(ctx, "widget", id); err != nil {
		return err
	}
	var state string
	var version int64
	if err := tx.QueryRowContext(ctx, `SELECT state, version FROM suite_widgets WHERE id = ?`, id).Scan(&state, &version); err != nil {
		return err
	}
	next := fmt.Sprintf("s%d", version+1)
	if _, err := tx.ExecContext(ctx, `UPDATE suite_widgets SET state = ?, version = ? WHERE id = ?`, next, version+1, id); err != nil {
		return err
	}
	return tx.Append(ctx, widgetEvent(id, version+1, state, next))
}

func insertWidget(t *testing.T, db *sqlitestore.DB) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := db.Writer().ExecContext(testCtx(t), `INSERT INTO suite_widgets (id, state, version) VALUES (?, 'initialized', 0)`, id); err != nil {
		t.Fatal(err)
	}
	return id
}

func count(t *testing.T, db *sqlitestore.DB, query string, args ...any) int {
	t.Helper()
	var n int
	if err := db.Reader().QueryRowContext(testCtx(t), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []sqlitestore.Config{
		{},
		{Path: "  "},
		{Path: "a.db?mode=ro"},
		{Path: "a.db#x"},
		{Path: "a.db", BusyTimeout: -time.Second},
		{Path: "a.db", ReadConns: -1},
		{Path: "a.db", Synchronous: "OFF"},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", c)
		}
		if db, err := sqlitestore.Open(context.Background(), c); err == nil {
			_ = db.Close()
			t.Errorf("Open(%+v) succeeded", c)
		}
	}
	for _, c := range []sqlitestore.Config{
		{Path: "a.db"},
		{Path: sqlitestore.Memory},
		{Path: "a.db", Synchronous: "normal", ReadConns: 2, BusyTimeout: time.Second, OneConnection: true},
	} {
		if err := c.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", c, err)
		}
	}
}

func TestOpenCreatesTheDirectoryAndFailsCleanly(t *testing.T) {
	t.Parallel()
	path := tempPath(t)
	db := open(t, sqlitestore.Config{Path: path})
	if db.Path() != path {
		t.Errorf("Path() = %q, want %q", db.Path(), path)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database file not created: %v", err)
	}
	var mode string
	if err := db.Reader().QueryRowContext(testCtx(t), `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v; want wal", mode, err)
	}
	var fk int
	if err := db.Writer().QueryRowContext(testCtx(t), `PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys = %d, %v; want 1", fk, err)
	}
	// The reader pool refuses writes: they would bypass the single writer.
	if _, err := db.Reader().ExecContext(testCtx(t), `INSERT INTO outbox_offsets (consumer_group) VALUES ('x')`); err == nil {
		t.Fatal("a write through the reader pool succeeded")
	}

	// A parent that is a file cannot become a directory: an error, no panic.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if db, err := sqlitestore.Open(testCtx(t), sqlitestore.Config{Path: filepath.Join(file, "x.db")}); err == nil {
		_ = db.Close()
		t.Fatal("Open under a regular file succeeded")
	}
}

func TestMigrateIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework()); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	files, err := fs.Glob(sqlitestore.Framework().FS, "*.sql")
	if err != nil || len(files) == 0 {
		t.Fatalf("framework migrations: %v, %v", files, err)
	}
	if n := count(t, db, `SELECT count(*) FROM statemill_schema_version WHERE version_id > 0 AND is_applied`); n != len(files) {
		t.Fatalf("applied migrations recorded = %d, want %d", n, len(files))
	}
	for _, table := range []string{"history", "outbox", "outbox_offsets", "idempotency_keys", "replay_requests"} {
		if n := count(t, db, `SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?`, table); n != 1 {
			t.Errorf("table %s missing after Migrate", table)
		}
	}
	// A domain's set has its own version table.
	domain := sqlitestore.MigrationSet{Name: "gadgets", FS: fstest.MapFS{
		"00001_gadgets.sql": {Data: []byte("-- +goose Up\nCREATE TABLE gadgets (id TEXT PRIMARY KEY);\n-- +goose Down\nDROP TABLE gadgets;\n")},
	}}
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework(), domain); err != nil {
		t.Fatalf("Migrate with a domain set: %v", err)
	}
	if n := count(t, db, `SELECT count(*) FROM gadgets_schema_version WHERE version_id > 0`); n != 1 {
		t.Fatalf("domain migrations recorded = %d, want 1", n)
	}
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.MigrationSet{}); err == nil {
		t.Fatal("Migrate accepted a set without a name")
	}
}

func TestHistoryIsAppendOnly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	s := sqlitestore.New(db)
	id := insertWidget(t, db)
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{
		`UPDATE history SET to_state = 'forged'`,
		`UPDATE history SET attributes = '{}' WHERE version = 1`,
		`DELETE FROM history`,
		`DELETE FROM history WHERE version = 1`,
	} {
		_, err := db.Writer().ExecContext(ctx, stmt)
		if err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: err = %v, want the append-only trigger to refuse it", stmt, err)
		}
	}
	if n := count(t, db, `SELECT count(*) FROM history WHERE to_state = 's1'`); n != 1 {
		t.Fatalf("history changed: %d rows in the original state", n)
	}
}

func TestDataSurvivesReopenAndOffsetsAreNeverReused(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	path := tempPath(t)
	db := open(t, sqlitestore.Config{Path: path})
	id := insertWidget(t, db)
	s := sqlitestore.New(db)
	for range 3 {
		if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
			t.Fatal(err)
		}
	}
	ob := sqlitestore.NewOutbox(db)
	if err := ob.Ack(ctx, "relay", 3); err != nil {
		t.Fatal(err)
	}
	if n, err := ob.Prune(ctx, 0); err != nil || n != 3 {
		t.Fatalf("Prune = %d, %v; want all 3 published rows", n, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework()); err != nil {
		t.Fatal(err)
	}
	s, ob = sqlitestore.New(db), sqlitestore.NewOutbox(db)
	if got, err := s.History(ctx, "widget", id); err != nil || len(got) != 3 {
		t.Fatalf("History after reopen = %d events, %v; want 3", len(got), err)
	}
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
		t.Fatal(err)
	}
	// The outbox was emptied; a reused offset 1 would sit below the
	// relay's acknowledged 3 and never be published.
	msgs, err := ob.Read(ctx, 3, 10)
	if err != nil || len(msgs) != 1 || msgs[0].Offset != 4 {
		t.Fatalf("rows after the acknowledged offset = %+v, %v; want one at offset 4", msgs, err)
	}
	if n, err := ob.Pending(ctx, "relay"); err != nil || n != 1 {
		t.Fatalf("Pending = %d, %v; want 1", n, err)
	}
}

func TestWakeupAfterCommitsThatAppend(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	s, ob := sqlitestore.New(db), sqlitestore.NewOutbox(db)
	id := insertWidget(t, db)
	closed := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}

	w := ob.Wakeup()
	// Commits notify before InTx returns, so these checks need no waiting.
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error {
		_, err := tx.ExecContext(ctx, `UPDATE suite_widgets SET state = 'x' WHERE id = ?`, id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if closed(w) {
		t.Fatal("a commit that appended nothing woke the relay")
	}
	boom := errors.New("boom")
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error {
		if err := step(ctx, tx, id); err != nil {
			return err
		}
		return boom
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if closed(w) {
		t.Fatal("a rolled-back append woke the relay")
	}

	// A relay asleep on the channel wakes on the next commit.
	woke := make(chan struct{})
	go func() {
		select {
		case <-w:
			close(woke)
		case <-ctx.Done():
		}
	}()
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woke:
	case <-time.After(5 * time.Second):
		t.Fatal("the relay did not wake after a commit that appended")
	}
	next := ob.Wakeup()
	if closed(next) {
		t.Fatal("the channel after a wake-up is already closed")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if !closed(next) {
		t.Fatal("Close did not wake the relay")
	}
}

func TestOutboxReader(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	s, ob := sqlitestore.New(db), sqlitestore.NewOutbox(db)
	a, b := insertWidget(t, db), insertWidget(t, db)
	var ids []string
	for i := range 6 {
		id := a
		if i%2 == 1 {
			id = b
		}
		if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
			t.Fatal(err)
		}
		h, err := s.History(ctx, "widget", id)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, h[len(h)-1].ID)
	}

	first, err := ob.Read(ctx, 0, 4)
	if err != nil || len(first) != 4 {
		t.Fatalf("Read(0, 4) = %d rows, %v", len(first), err)
	}
	rest, err := ob.Read(ctx, first[3].Offset, 100)
	if err != nil || len(rest) != 2 {
		t.Fatalf("Read after %d = %d rows, %v; want 2", first[3].Offset, len(rest), err)
	}
	all := append(first, rest...)
	for i, m := range all {
		if m.EventID != ids[i] {
			t.Fatalf("row %d is event %s, want %s: not in commit order", i, m.EventID, ids[i])
		}
		if i > 0 && m.Offset <= all[i-1].Offset {
			t.Fatalf("offsets not increasing: %d then %d", all[i-1].Offset, m.Offset)
		}
		if m.RoutingKey != "widget.step" || m.SchemaVersion != 1 || m.CorrelationID != "corr" ||
			m.CreatedAt.IsZero() || time.Since(m.CreatedAt) > time.Minute {
			t.Errorf("row %d = %+v", i, m)
		}
		msg := m.Message()
		if msg.UUID != m.EventID || msg.Metadata.Get(envelope.HeaderCorrelationID) != "corr" ||
			msg.Metadata.Get(envelope.HeaderSchemaVersion) != "1" {
			t.Errorf("row %d message = %s %v", i, msg.UUID, msg.Metadata)
		}
		if e, err := envelope.Decode(msg.Payload); err != nil || e.ID != m.EventID {
			t.Errorf("row %d payload = %v, %v", i, e, err)
		}
	}
	if _, err := ob.Read(ctx, 0, 0); err == nil {
		t.Error("Read with limit 0 succeeded")
	}

	if off, err := ob.Offset(ctx, "relay"); err != nil || off != 0 {
		t.Fatalf("Offset before any Ack = %d, %v", off, err)
	}
	if n, err := ob.Pending(ctx, "relay"); err != nil || n != 6 {
		t.Fatalf("Pending = %d, %v; want 6", n, err)
	}
	if n, err := ob.Prune(ctx, 0); err != nil || n != 0 {
		t.Fatalf("Prune without any relay = %d, %v; want nothing: nothing is published", n, err)
	}
	if err := ob.Ack(ctx, "relay", all[3].Offset); err != nil {
		t.Fatal(err)
	}
	if err := ob.Ack(ctx, "relay", all[1].Offset); err != nil { // a late, older ack
		t.Fatal(err)
	}
	if off, err := ob.Offset(ctx, "relay"); err != nil || off != all[3].Offset {
		t.Fatalf("Offset = %d, %v; want %d (never backwards)", off, err, all[3].Offset)
	}
	if n, err := ob.Pending(ctx, "relay"); err != nil || n != 2 {
		t.Fatalf("Pending = %d, %v; want 2", n, err)
	}
	if n, err := ob.Pending(ctx, "other"); err != nil || n != 6 {
		t.Fatalf("Pending of another group = %d, %v; want 6", n, err)
	}

	if n, err := ob.Prune(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("Prune within the retention = %d, %v; want 0", n, err)
	}
	if err := ob.Ack(ctx, "audit", all[1].Offset); err != nil {
		t.Fatal(err)
	}
	if n, err := ob.Prune(ctx, 0); err != nil || n != 2 {
		t.Fatalf("Prune = %d, %v; want the 2 rows both groups published", n, err)
	}
	left, err := ob.Read(ctx, 0, 100)
	if err != nil || len(left) != 4 || left[0].Offset != all[2].Offset {
		t.Fatalf("after Prune: %d rows from offset %d, %v; want 4 from %d", len(left), left[0].Offset, err, all[2].Offset)
	}
	if n, err := ob.Prune(ctx, -time.Second); err == nil {
		t.Fatalf("Prune with a negative retention = %d, nil", n)
	}
}

// WAL lets a read snapshot stay open while commands commit; and since
// sequence order is commit order here, everything committed after the
// snapshot has a greater sequence than anything it saw.
func TestReadSnapshotDoesNotBlockCommands(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	s := sqlitestore.New(db)
	id := insertWidget(t, db)
	for range 3 {
		if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := db.Reader().BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Rollback() //nolint:errcheck
	var watermark int64
	if err := snap.QueryRowContext(ctx, `SELECT max(sequence) FROM history`).Scan(&watermark); err != nil {
		t.Fatal(err)
	}

	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for range 3 {
		if err := s.InTx(cctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
			t.Fatalf("a command behind an open read snapshot: %v", err)
		}
	}
	var seen int64
	if err := snap.QueryRowContext(ctx, `SELECT count(*) FROM history`).Scan(&seen); err != nil || seen != 3 {
		t.Fatalf("the snapshot sees %d rows, %v; want the 3 committed before it", seen, err)
	}
	got, err := s.History(ctx, "widget", id)
	if err != nil || len(got) != 6 {
		t.Fatalf("History = %d, %v; want 6", len(got), err)
	}
	for _, e := range got[3:] {
		if e.Sequence <= watermark {
			t.Fatalf("event v%d committed after the snapshot has sequence %d <= its watermark %d", e.Version, e.Sequence, watermark)
		}
	}
}

// Two processes on one file (two DBs here): each has its own writer, and
// BEGIN IMMEDIATE makes the read-then-write commands wait for the write
// lock under busy_timeout instead of failing with "database is locked" on
// the upgrade, as deferred transactions do.
func TestTwoWritersOnOneFile(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	path := tempPath(t)
	first := open(t, sqlitestore.Config{Path: path})
	second, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = second.Close() })
	id := insertWidget(t, first)

	const perDB, workers, commands = 2, 3, 15
	var wg sync.WaitGroup
	errs := make(chan error, perDB*workers)
	for _, db := range []*sqlitestore.DB{first, second} {
		s := sqlitestore.New(db)
		for range workers {
			wg.Go(func() {
				for range commands {
					if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
						errs <- err
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a command failed: %v", err)
	}
	const total = perDB * workers * commands
	got, err := sqlitestore.New(first).History(ctx, "widget", id)
	if err != nil || len(got) != total {
		t.Fatalf("History = %d events, %v; want %d", len(got), err, total)
	}
	for i, e := range got {
		if e.Version != int64(i+1) || (i > 0 && e.Sequence <= got[i-1].Sequence) {
			t.Fatalf("event %d: version %d sequence %d: versions must be gapless and in sequence order", i, e.Version, e.Sequence)
		}
	}
}

func TestLockHeldBeyondBusyTimeoutIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	path := tempPath(t)
	db := open(t, sqlitestore.Config{Path: path})
	s := sqlitestore.New(db)
	id := insertWidget(t, db)

	// Another process holds the write lock.
	other, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	holder, err := other.Writer().BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}

	short, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: path, BusyTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = short.Close() })
	start := time.Now()
	err = sqlitestore.New(short).InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) })
	elapsed := time.Since(start)
	if code := apperr.CodeOf(err); code != apperr.Unavailable {
		t.Fatalf("InTx while another process writes = %v (code %s), want %s", err, code, apperr.Unavailable)
	}
	if !sqlitestore.Unavailable(err) {
		t.Errorf("Unavailable(%v) = false", err)
	}
	if elapsed < 150*time.Millisecond || elapsed > 3*time.Second {
		t.Errorf("gave up after %v, want about the 200ms busy timeout", elapsed)
	}
	if err := holder.Rollback(); err != nil {
		t.Fatal(err)
	}
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return step(ctx, tx, id) }); err != nil {
		t.Fatalf("InTx after the lock was released: %v", err)
	}
}

func TestClassifyAndUniqueViolations(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	if sqlitestore.Classify(nil) != nil {
		t.Fatal("Classify(nil) != nil")
	}
	coded := apperr.Errorf(apperr.Conflict, "discontinued")
	if got := sqlitestore.Classify(fmt.Errorf("wrapped: %w", coded)); apperr.CodeOf(got) != apperr.Conflict {
		t.Fatalf("a coded error lost its code: %v", got)
	}
	plain := errors.New("some bug")
	if got := sqlitestore.Classify(plain); got != plain {
		t.Fatalf("a plain error was changed: %v", got)
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{context.DeadlineExceeded, true},
		{fmt.Errorf("begin: %w", context.DeadlineExceeded), true},
		{sql.ErrConnDone, true},
		{context.Canceled, false},
		{plain, false},
	} {
		if got := sqlitestore.Unavailable(tc.err); got != tc.want {
			t.Errorf("Unavailable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}

	db := open(t, sqlitestore.Config{Path: tempPath(t)})
	s := sqlitestore.New(db)
	id := insertWidget(t, db)
	e := widgetEvent(id, 1, "initialized", "created")
	dup := *e
	dup.ID = uuid.NewString()
	err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return tx.Append(ctx, e, &dup) })
	if !sqlitestore.IsUniqueViolation(err, sqlitestore.HistoryVersionKey) || !sqlitestore.IsUniqueViolation(err, "") {
		t.Fatalf("IsUniqueViolation(%v) = false", err)
	}
	if sqlitestore.IsUniqueViolation(err, "history.event_id") || sqlitestore.IsUniqueViolation(plain, "") || sqlitestore.IsUniqueViolation(nil, "") {
		t.Fatal("IsUniqueViolation matched other columns or a non-database error")
	}
	if apperr.CodeOf(err) == apperr.Unavailable || sqlitestore.Unavailable(err) {
		t.Fatalf("a constraint violation was classified as unavailable: %v", err)
	}

	o := store.Outcome{Fingerprint: "f", Response: json.RawMessage(`{}`)}
	remember := func() error {
		return s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error { return tx.Remember(ctx, "k", o) })
	}
	if err := remember(); err != nil {
		t.Fatal(err)
	}
	if err := remember(); !sqlitestore.IsUniqueViolation(err, "idempotency_keys.key") {
		t.Fatalf("a second Remember of one key = %v, want a violation of idempotency_keys.key", err)
	}

	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = s.History(ctx, "widget", id)
	if apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("History on a closed DB = %v, want %s", err, apperr.Unavailable)
	}
}

func TestForgetOutcomes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := open(t, sqlitestore.Config{Path: sqlitestore.Memory})
	s := sqlitestore.New(db)
	if err := s.InTx(ctx, func(ctx context.Context, tx *sqlitestore.Tx) error {
		return tx.Remember(ctx, "k", store.Outcome{Fingerprint: "f", Response: json.RawMessage(`{"a":1}`)})
	}); err != nil {
		t.Fatal(err)
	}
	if n, err := s.ForgetOutcomes(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("ForgetOutcomes(1h) = %d, %v; want 0", n, err)
	}
	// created_at has millisecond resolution: wait until the row is older
	// than "now", with a deadline.
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := s.ForgetOutcomes(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ForgetOutcomes(0) never deleted the outcome")
		}
		time.Sleep(time.Millisecond) // a poll under the deadline above
	}
	if _, found, err := s.Recall(ctx, "k"); err != nil || found {
		t.Fatalf("Recall after ForgetOutcomes: found %v, %v", found, err)
	}
}

func TestMemoryDatabasesAreSeparate(t *testing.T) {
	t.Parallel()
	a := open(t, sqlitestore.Config{Path: sqlitestore.Memory})
	b := open(t, sqlitestore.Config{Path: sqlitestore.Memory})
	insertWidget(t, a)
	if n := count(t, a, `SELECT count(*) FROM suite_widgets`); n != 1 {
		t.Fatalf("widgets in a = %d, want 1", n)
	}
	if n := count(t, b, `SELECT count(*) FROM suite_widgets`); n != 0 {
		t.Fatalf("widgets in b = %d, want 0: two in-memory databases share data", n)
	}
}
