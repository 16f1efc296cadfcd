package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sandbox"
)

const historyVersionKey = "history_entity_type_entity_id_version_key"

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openPool opens a small pool on url (small: the server's max_connections is
// shared by every package testing in parallel).
func openPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgstore.Open(testCtx(t), pgstore.PoolConfig{URL: url, MaxConns: 4})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// newStore gives t a fresh database with the framework schema and a test
// entity table "widgets" (infra must not know any real entity).
func newStore(t *testing.T) *pgstore.Store {
	t.Helper()
	ctx := testCtx(t)
	pool := openPool(t, sandbox.Postgres(t))
	if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE widgets (id uuid PRIMARY KEY, state text NOT NULL, version bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return pgstore.New(pool, nil)
}

// widgetEvent is a transition of the test entity "widget".
func widgetEvent(entityID string, version int64, event, from, to string) *envelope.Event {
	return &envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		EntityType:    "widget",
		EntityID:      entityID,
		Version:       version,
		Event:         event,
		From:          from,
		To:            to,
		Attributes:    json.RawMessage(fmt.Sprintf(`{"id":%q,"state":%q,"size":%d,"tags":["a","b"]}`, entityID, to, version)),
		OccurredAt:    time.Now().UTC().Truncate(time.Microsecond),
		CorrelationID: "corr-" + entityID[:8],
	}
}

// insertWidget creates a widget row in its own transaction.
func insertWidget(t *testing.T, s *pgstore.Store) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := s.Pool().Exec(testCtx(t), `INSERT INTO widgets (id, state, version) VALUES ($1, 'initialized', 0)`, id); err != nil {
		t.Fatal(err)
	}
	return id
}

// transition is what a command handler does: lock the row first, update it,
// append the events.
func transition(ctx context.Context, tx *pgstore.Tx, id string, events ...*envelope.Event) error {
	var state string
	if err := tx.QueryRow(ctx, `SELECT state FROM widgets WHERE id = $1 FOR UPDATE`, id).Scan(&state); err != nil {
		return err
	}
	last := events[len(events)-1]
	if _, err := tx.Exec(ctx, `UPDATE widgets SET state = $2, version = $3 WHERE id = $1`, id, last.To, last.Version); err != nil {
		return err
	}
	return tx.Append(ctx, events...)
}

func count(t *testing.T, s *pgstore.Store, query string, args ...any) int {
	t.Helper()
	var n int
	if err := s.Pool().QueryRow(testCtx(t), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

func sameJSON(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("not JSON: %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("not JSON: %s: %v", b, err)
	}
	return reflect.DeepEqual(x, y)
}

func TestPoolConfigValidate(t *testing.T) {
	t.Parallel()
	if err := (pgstore.PoolConfig{}).Validate(); err == nil {
		t.Fatal("empty URL accepted")
	}
	if _, err := pgstore.Open(context.Background(), pgstore.PoolConfig{}); err == nil {
		t.Fatal("Open with an empty URL succeeded")
	}
}

// migrationFiles counts the framework's embedded migrations.
func migrationFiles(t *testing.T) int {
	t.Helper()
	files, err := fs.Glob(pgstore.Framework().FS, "*.sql")
	if err != nil || len(files) == 0 {
		t.Fatalf("framework migrations: %v, %v", files, err)
	}
	return len(files)
}

func TestMigrateIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	pool := openPool(t, sandbox.Postgres(t))
	for i := range 2 {
		if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); err != nil {
			t.Fatalf("Migrate #%d: %v", i+1, err)
		}
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM statemill_schema_version WHERE version_id > 0 AND is_applied`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if want := migrationFiles(t); n != want {
		t.Fatalf("applied migrations recorded = %d, want %d (each file applied once)", n, want)
	}
	for _, table := range []string{"history", "watermill_outbox", "watermill_offsets_outbox"} {
		var exists bool
		if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, table).Scan(&exists); err != nil || !exists {
			t.Fatalf("table %s missing after Migrate (err %v)", table, err)
		}
	}
}

func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := sandbox.Postgres(t)
	pools := []*pgxpool.Pool{openPool(t, url), openPool(t, url)}
	var wg sync.WaitGroup
	errs := make([]error, len(pools))
	start := make(chan struct{})
	for i, p := range pools {
		wg.Go(func() {
			<-start
			errs[i] = pgstore.Migrate(ctx, p, pgstore.Framework())
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("concurrent Migrate #%d: %v", i+1, err)
		}
	}
	var n int
	if err := pools[0].QueryRow(ctx, `SELECT count(*) FROM statemill_schema_version WHERE version_id > 0 AND is_applied`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if want := migrationFiles(t); n != want {
		t.Fatalf("applied migrations recorded = %d, want %d", n, want)
	}
}

func TestAppendWritesHistoryAndOutboxInOneTransaction(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	id := insertWidget(t, s)
	events := []*envelope.Event{
		widgetEvent(id, 1, "create", "initialized", "created"),
		widgetEvent(id, 2, "fill", "created", "full"),
		widgetEvent(id, 3, "empty", "full", "empty"),
	}
	var xid string
	err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if err := transition(ctx, tx, id, events...); err != nil {
			return err
		}
		return tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text`).Scan(&xid)
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}

	for i, e := range events {
		if e.Sequence <= 0 {
			t.Fatalf("event %d: sequence not filled in", i)
		}
		if i > 0 && e.Sequence <= events[i-1].Sequence {
			t.Fatalf("sequences not increasing: %d then %d", events[i-1].Sequence, e.Sequence)
		}
	}

	rows, err := s.Pool().Query(ctx, `SELECT event_id::text, sequence, transaction_id::text, version, event FROM history ORDER BY sequence`)
	if err != nil {
		t.Fatal(err)
	}
	type hrow struct {
		ID, Xid, Event string
		Seq, Version   int64
	}
	hist, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (hrow, error) {
		var h hrow
		return h, r.Scan(&h.ID, &h.Seq, &h.Xid, &h.Version, &h.Event)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(hist) != len(events) {
		t.Fatalf("history rows = %d, want %d", len(hist), len(events))
	}
	for i, h := range hist {
		e := events[i]
		if h.ID != e.ID || h.Seq != e.Sequence || h.Version != e.Version || h.Event != e.Event {
			t.Errorf("history row %d = %+v, want event %s seq %d v%d %s", i, h, e.ID, e.Sequence, e.Version, e.Event)
		}
		if h.Xid == "" || h.Xid == "0" || h.Xid != xid {
			t.Errorf("history row %d transaction_id = %q, want the writing transaction's xid %q", i, h.Xid, xid)
		}
	}

	orows, err := s.Pool().Query(ctx, `SELECT payload::text, transaction_id::text FROM watermill_outbox ORDER BY "offset"`)
	if err != nil {
		t.Fatal(err)
	}
	type orow struct{ Payload, Xid string }
	outbox, err := pgx.CollectRows(orows, func(r pgx.CollectableRow) (orow, error) {
		var o orow
		return o, r.Scan(&o.Payload, &o.Xid)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(outbox) != len(events) {
		t.Fatalf("outbox rows = %d, want %d", len(outbox), len(events))
	}
	for i, o := range outbox {
		e := events[i]
		var env struct {
			DestinationTopic string            `json:"destination_topic"`
			UUID             string            `json:"uuid"`
			Payload          []byte            `json:"payload"`
			Metadata         map[string]string `json:"metadata"`
		}
		if err := json.Unmarshal([]byte(o.Payload), &env); err != nil {
			t.Fatalf("outbox row %d is not a forwarder envelope: %v: %s", i, err, o.Payload)
		}
		if env.DestinationTopic != "widget."+e.Event {
			t.Errorf("outbox row %d destination_topic = %q, want %q", i, env.DestinationTopic, "widget."+e.Event)
		}
		if env.UUID != e.ID {
			t.Errorf("outbox row %d uuid = %q, want the event id %q", i, env.UUID, e.ID)
		}
		if env.Metadata[envelope.HeaderCorrelationID] != e.CorrelationID || env.Metadata[envelope.HeaderSchemaVersion] != "1" {
			t.Errorf("outbox row %d metadata = %v", i, env.Metadata)
		}
		got, err := envelope.Decode(env.Payload)
		if err != nil {
			t.Fatalf("outbox row %d: inner payload does not decode: %v", i, err)
		}
		if got.ID != e.ID || got.Sequence != e.Sequence || got.Version != e.Version || got.Event != e.Event ||
			got.From != e.From || got.To != e.To || !got.OccurredAt.Equal(e.OccurredAt) || got.EntityID != id {
			t.Errorf("outbox row %d event = %+v, want %+v", i, got, *e)
		}
		if o.Xid != xid {
			t.Errorf("outbox row %d transaction_id = %q, want %q", i, o.Xid, xid)
		}
	}
}

func TestFailingTransactionWritesNothing(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	id := insertWidget(t, s)

	// fn fails after appending: everything is rolled back.
	boom := errors.New("boom after append")
	err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if err := transition(ctx, tx, id, widgetEvent(id, 1, "create", "initialized", "created")); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("InTx error = %v, want the fn's error", err)
	}
	if n := count(t, s, `SELECT count(*) FROM history`); n != 0 {
		t.Fatalf("history rows after rollback = %d", n)
	}
	if n := count(t, s, `SELECT count(*) FROM watermill_outbox`); n != 0 {
		t.Fatalf("outbox rows after rollback = %d", n)
	}
	if n := count(t, s, `SELECT count(*) FROM widgets WHERE state = 'initialized' AND version = 0`); n != 1 {
		t.Fatal("the entity row change was not rolled back")
	}

	// A statement failing midway (a duplicate version) rolls back the rows
	// appended before it in the same transaction.
	if err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		return transition(ctx, tx, id, widgetEvent(id, 1, "create", "initialized", "created"))
	}); err != nil {
		t.Fatal(err)
	}
	err = s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		return transition(ctx, tx, id,
			widgetEvent(id, 2, "fill", "created", "full"),
			widgetEvent(id, 1, "create", "initialized", "created")) // version 1 exists
	})
	if err == nil {
		t.Fatal("appending a duplicate version succeeded")
	}
	if !pgstore.IsUniqueViolation(err, historyVersionKey) || !pgstore.IsUniqueViolation(err, "") {
		t.Fatalf("IsUniqueViolation(%v) = false", err)
	}
	if pgstore.IsUniqueViolation(err, "some_other_constraint") {
		t.Fatal("IsUniqueViolation matched another constraint name")
	}
	if pgstore.IsUniqueViolation(boom, "") || pgstore.IsUniqueViolation(nil, "") {
		t.Fatal("IsUniqueViolation matched a non-database error")
	}
	if code := apperr.CodeOf(err); code == apperr.Unavailable {
		t.Fatalf("a constraint violation was classified as %s", code)
	}
	if n := count(t, s, `SELECT count(*) FROM history`); n != 1 {
		t.Fatalf("history rows = %d, want only the committed one", n)
	}
	if n := count(t, s, `SELECT count(*) FROM watermill_outbox`); n != 1 {
		t.Fatalf("outbox rows = %d, want only the committed one", n)
	}
	if n := count(t, s, `SELECT count(*) FROM widgets WHERE state = 'created' AND version = 1`); n != 1 {
		t.Fatal("the failed transaction's entity update was not rolled back")
	}
}

func TestHistoryIsAppendOnly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	id := insertWidget(t, s)
	if err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		return transition(ctx, tx, id, widgetEvent(id, 1, "create", "initialized", "created"))
	}); err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{
		`UPDATE history SET to_state = 'forged'`,
		`UPDATE history SET attributes = '{}'::jsonb WHERE version = 1`,
		`DELETE FROM history`,
		`DELETE FROM history WHERE version = 1`,
		`TRUNCATE history`,
		`TRUNCATE history CASCADE`,
	} {
		_, err := s.Pool().Exec(ctx, stmt)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) {
			t.Errorf("%s: err = %v, want the append-only trigger to refuse it", stmt, err)
			continue
		}
		if pgErr.Code != "42501" || !strings.Contains(pgErr.Message, "append-only") {
			t.Errorf("%s: refused with %s %q, want 42501 append-only", stmt, pgErr.Code, pgErr.Message)
		}
	}
	if n := count(t, s, `SELECT count(*) FROM history WHERE to_state = 'created'`); n != 1 {
		t.Fatalf("history changed: %d rows in the original state", n)
	}
}

func TestHistoryReturnsWhatWasAppended(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	a, b := insertWidget(t, s), insertWidget(t, s)
	var appended []*envelope.Event
	steps := []struct {
		id     string
		events []*envelope.Event
	}{
		{a, []*envelope.Event{widgetEvent(a, 1, "create", "initialized", "created"), widgetEvent(a, 2, "fill", "created", "full")}},
		{b, []*envelope.Event{widgetEvent(b, 1, "create", "initialized", "created")}},
		{a, []*envelope.Event{widgetEvent(a, 3, "empty", "full", "empty")}},
		{b, []*envelope.Event{widgetEvent(b, 2, "fill", "created", "full")}},
	}
	for _, st := range steps {
		if err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
			return transition(ctx, tx, st.id, st.events...)
		}); err != nil {
			t.Fatal(err)
		}
		if st.id == a {
			appended = append(appended, st.events...)
		}
	}

	got, err := s.History(ctx, "widget", a)
	if err != nil {
		t.Fatalf("History: %v", err)
	}
	if len(got) != len(appended) {
		t.Fatalf("History returned %d events, want %d", len(got), len(appended))
	}
	for i, g := range got {
		w := *appended[i]
		if g.Version != int64(i+1) {
			t.Errorf("event %d has version %d: not in version order", i, g.Version)
		}
		if !sameJSON(t, g.Attributes, w.Attributes) {
			t.Errorf("event %d attributes = %s, want %s", i, g.Attributes, w.Attributes)
		}
		if !g.OccurredAt.Equal(w.OccurredAt) || g.OccurredAt.Location() != time.UTC {
			t.Errorf("event %d occurred_at = %v, want %v in UTC", i, g.OccurredAt, w.OccurredAt)
		}
		g.Attributes, w.Attributes = nil, nil
		g.OccurredAt, w.OccurredAt = time.Time{}, time.Time{}
		if !reflect.DeepEqual(g, w) {
			t.Errorf("event %d:\n got %+v\nwant %+v", i, g, w)
		}
	}

	none, err := s.History(ctx, "widget", uuid.NewString())
	if err != nil || len(none) != 0 {
		t.Fatalf("History of an unknown entity = %v, %v; want empty", none, err)
	}
	other, err := s.History(ctx, "gadget", a)
	if err != nil || len(other) != 0 {
		t.Fatalf("History of another entity type = %v, %v; want empty", other, err)
	}
}

// The live event (outbox payload) and the stored one (history) must carry the
// same values, also when a caller hands in a time PostgreSQL cannot store
// exactly (nanoseconds, another zone).
func TestAppendStoresTheOccurredAtItPublishes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	id := insertWidget(t, s)
	e := widgetEvent(id, 1, "create", "initialized", "created")
	e.OccurredAt = time.Date(2026, 11, 28, 11, 0, 0, 123456789, time.FixedZone("CET", 3600))
	if err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error { return transition(ctx, tx, id, e) }); err != nil {
		t.Fatal(err)
	}
	var payload []byte
	if err := s.Pool().QueryRow(ctx, `SELECT payload::text FROM watermill_outbox`).Scan(&payload); err != nil {
		t.Fatal(err)
	}
	var env struct {
		Payload []byte `json:"payload"`
	}
	if err := json.Unmarshal(payload, &env); err != nil {
		t.Fatal(err)
	}
	live, err := envelope.Decode(env.Payload)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := s.History(ctx, "widget", id)
	if err != nil || len(stored) != 1 {
		t.Fatalf("History = %v, %v", stored, err)
	}
	if !live.OccurredAt.Equal(stored[0].OccurredAt) {
		t.Fatalf("published occurred_at %v differs from stored %v: a replay would not equal the live event",
			live.OccurredAt, stored[0].OccurredAt)
	}
	if !e.OccurredAt.Equal(stored[0].OccurredAt) {
		t.Fatalf("Append left the event's occurred_at at %v, stored %v", e.OccurredAt, stored[0].OccurredAt)
	}
}

func TestUnreachableDatabaseIsUnavailable(t *testing.T) {
	t.Parallel()
	pool, err := pgstore.Open(context.Background(), pgstore.PoolConfig{
		URL: "postgres://postgres@127.0.0.1:1/nothing?sslmode=disable", MaxConns: 2,
	})
	if err != nil {
		t.Fatalf("Open must not wait for the database: %v", err)
	}
	t.Cleanup(pool.Close)
	s := pgstore.New(pool, nil)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	called := false
	err = s.InTx(ctx, func(context.Context, *pgstore.Tx) error { called = true; return nil })
	elapsed := time.Since(start)
	if err == nil {
		t.Fatal("InTx against a closed port succeeded")
	}
	if called {
		t.Fatal("fn ran without a transaction")
	}
	if code := apperr.CodeOf(err); code != apperr.Unavailable {
		t.Fatalf("code = %q (%v), want %q", code, err, apperr.Unavailable)
	}
	if elapsed > 3500*time.Millisecond {
		t.Fatalf("InTx took %v to report an unreachable database, want about 3s at most", elapsed)
	}
	if _, err := s.History(ctx, "widget", uuid.NewString()); apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("History against a closed port: %v, want Unavailable", err)
	}
	if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("Migrate against a closed port: %v (code %s), want Unavailable", err, apperr.CodeOf(err))
	}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	if pgstore.Classify(nil) != nil {
		t.Fatal("Classify(nil) != nil")
	}
	coded := apperr.Errorf(apperr.Conflict, "discontinued")
	if got := pgstore.Classify(fmt.Errorf("wrapped: %w", coded)); apperr.CodeOf(got) != apperr.Conflict {
		t.Fatalf("a coded error lost its code: %v", got)
	}
	plain := errors.New("some bug")
	if got := pgstore.Classify(plain); got != plain {
		t.Fatalf("a plain error was changed: %v", got)
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&pgconn.PgError{Code: "23505"}, false},
		{&pgconn.PgError{Code: "40001"}, false},
		{&pgconn.PgError{Code: "08006"}, true},
		{&pgconn.PgError{Code: "57P01"}, true},
		{&pgconn.PgError{Code: "53300"}, true},
		{context.DeadlineExceeded, true},
		{fmt.Errorf("query: %w", context.DeadlineExceeded), true},
		{fmt.Errorf("lock widget: %w", io.ErrUnexpectedEOF), true}, // the server died mid-statement
	} {
		if got := pgstore.Unreachable(tc.err); got != tc.want {
			t.Errorf("Unreachable(%v) = %v, want %v", tc.err, got, tc.want)
		}
		wantCode := apperr.Internal
		if tc.want {
			wantCode = apperr.Unavailable
		}
		if got := apperr.CodeOf(pgstore.Classify(tc.err)); got != wantCode {
			t.Errorf("CodeOf(Classify(%v)) = %s, want %s", tc.err, got, wantCode)
		}
	}
}

// step fires one transition on widget id after locking it, reading its
// version under the lock.
func step(ctx context.Context, tx *pgstore.Tx, id string, lockEntity bool) error {
	if lockEntity {
		if err := tx.LockEntity(ctx, "widget", id); err != nil {
			return err
		}
	}
	var state string
	var version int64
	if err := tx.QueryRow(ctx, `SELECT state, version FROM widgets WHERE id = $1 FOR UPDATE`, id).Scan(&state, &version); err != nil {
		return err
	}
	next := fmt.Sprintf("s%d", version+1)
	if _, err := tx.Exec(ctx, `UPDATE widgets SET state = $2, version = $3 WHERE id = $1`, id, next, version+1); err != nil {
		return err
	}
	return tx.Append(ctx, widgetEvent(id, version+1, "step", state, next))
}

// xidInversions counts the history rows of widget id whose transaction id is
// smaller than that of the version before: the relay publishes in xid order,
// so each inversion is an event published out of per-entity order.
func xidInversions(t *testing.T, s *pgstore.Store, id string) int {
	t.Helper()
	return count(t, s, `SELECT count(*) FROM (
		SELECT transaction_id, lag(transaction_id) OVER (ORDER BY version) AS prev FROM history WHERE entity_id = $1
	) h WHERE prev > transaction_id`, id)
}

func TestLockEntityMakesXidOrderFollowLockOrder(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t)
	const workers, steps = 8, 25
	run := func(id string, lockEntity bool) {
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for range workers {
			wg.Go(func() {
				for range steps {
					if err := s.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error { return step(ctx, tx, id, lockEntity) }); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if n := count(t, s, `SELECT count(DISTINCT version) FROM history WHERE entity_id = $1 AND version BETWEEN 1 AND $2`, id, workers*steps); n != workers*steps {
			t.Fatalf("widget %s has %d distinct versions, want %d: lost update", id, n, workers*steps)
		}
	}

	// Control: with SELECT ... FOR UPDATE alone, PostgreSQL may hand out xids
	// out of lock order under contention. Logged only: it is a race.
	plain := insertWidget(t, s)
	run(plain, false)
	t.Logf("SELECT ... FOR UPDATE first only: %d of %d transitions have a smaller xid than the version before",
		xidInversions(t, s, plain), workers*steps)

	locked := insertWidget(t, s)
	run(locked, true)
	if n := xidInversions(t, s, locked); n != 0 {
		t.Fatalf("with LockEntity first, %d of %d transitions have a smaller xid than the version before: "+
			"the relay would publish them out of per-entity order", n, workers*steps)
	}
}
