package replay_test

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/membroker"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/infra/sqlitestore"
)

// The responder on the embedded store: history and replay_requests in
// SQLite, the broker in process (membroker) as in the embedded mode, or
// RabbitMQ where a test measures the responder alone.

// sqliteEnv is an SQLite database with the framework schema and a broker
// namespace (env without PostgreSQL: its pool is nil).
type sqliteEnv struct {
	*env
	db *sqlitestore.DB
	st *sqlitestore.Store
}

// sqliteDBs are the ways the embedded mode opens its database: a file
// (single writer beside a read-only pool) and ":memory:" (one connection
// for everything).
var sqliteDBs = []string{"file", "memory"}

// onEachSQLite runs test in parallel on a file database and on a memory
// database, both on the in-process broker.
func onEachSQLite(t *testing.T, test func(t *testing.T, s *sqliteEnv)) {
	t.Parallel()
	for _, kind := range sqliteDBs {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			test(t, newSQLiteEnv(t, kind, true))
		})
	}
}

func newSQLiteEnv(t testing.TB, kind string, inProcess bool) *sqliteEnv {
	t.Helper()
	ctx := testCtx(t)
	path := sqlitestore.Memory
	if kind == "file" {
		path = filepath.Join(t.TempDir(), "replay.db")
	}
	db, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	return &sqliteEnv{env: newBrokerEnv(t, inProcess), db: db, st: sqlitestore.New(db)}
}

// newBrokerEnv is an env with a broker namespace and its shared topology
// declared, and no database.
func newBrokerEnv(t testing.TB, inProcess bool) *env {
	t.Helper()
	e := &env{}
	var ns string
	var dial broker.Dialer
	if inProcess {
		mb, err := membroker.New(membroker.Config{Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = mb.Close() })
		e.dial, ns = mb.Dialer(), sandbox.Name("t")
		dial = e.dial
	} else {
		e.amqpURL, ns = sandbox.Broker(t)
		dial = broker.AMQPDialer(e.amqpURL)
	}
	e.topo = broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	e.queue = ns + ".replay_requests"
	if !inProcess {
		sandbox.DeleteLater(t, []string{e.queue, e.queue + ".dead", e.topo.UnroutableQueue()},
			[]string{e.topo.EventsExchange, e.topo.CommandsExchange, e.topo.UnroutableExchange()})
	}
	conn, err := dial("replay test " + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	e.conn = conn
	if err := broker.DeclareShared(e.channel(t), e.topo); err != nil {
		t.Fatalf("DeclareShared: %v", err)
	}
	return e
}

func (s *sqliteEnv) useSQLite(c *replay.Config) { c.Pool, c.SQLite = nil, s.db }

func (s *sqliteEnv) config(mutate ...func(*replay.Config)) replay.Config {
	return s.env.config(append([]func(*replay.Config){s.useSQLite}, mutate...)...)
}

func (s *sqliteEnv) start(t testing.TB, mutate ...func(*replay.Config)) *running {
	t.Helper()
	return s.env.start(t, append([]func(*replay.Config){s.useSQLite}, mutate...)...)
}

// commit runs one command of n transitions on widget id, as a handler on
// the embedded store does.
func (s *sqliteEnv) commit(t testing.TB, id string, n int) []*envelope.Event {
	t.Helper()
	var events []*envelope.Event
	err := s.st.InTx(testCtx(t), func(ctx context.Context, tx *sqlitestore.Tx) error {
		events = nil
		state, version := "initialized", int64(0)
		err := tx.QueryRowContext(ctx, `SELECT to_state, version FROM history
			WHERE entity_type = 'widget' AND entity_id = ? ORDER BY version DESC LIMIT 1`, id).Scan(&state, &version)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		for range n {
			next, event := "even", "step"
			if (version+1)%2 == 1 {
				next = "odd"
			}
			if version == 0 {
				event = "create"
			}
			version++
			events = append(events, widgetEvent(id, version, event, state, next))
			state = next
		}
		return tx.Append(ctx, events...)
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}
	return events
}

// bulk inserts n widget transitions (5 versions per entity, attributes of
// about attrBytes) in one transaction, straight into history.
func (s *sqliteEnv) bulk(t testing.TB, n, attrBytes int) {
	t.Helper()
	ctx := testCtx(t)
	tx, err := s.db.Writer().BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback() //nolint:errcheck
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO history (event_id, entity_type, entity_id, version, event,
		from_state, to_state, attributes, correlation_id, occurred_at) VALUES (?, 'widget', ?, ?, ?, 'odd', 'even', ?, 'corr-bulk', ?)`)
	if err != nil {
		t.Fatal(err)
	}
	defer stmt.Close()
	label := strings.Repeat("x", attrBytes)
	at := time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")
	var entity string
	for g := range n {
		if g%5 == 0 {
			entity = uuid.NewString()
		}
		event := "step"
		if g%5 == 0 {
			event = "create"
		}
		attrs := fmt.Sprintf(`{"id":%q,"state":"even","size":%d,"label":%q}`, entity, g, label)
		if _, err := stmt.ExecContext(ctx, uuid.Must(uuid.NewV7()).String(), entity, g%5+1, event, attrs, at); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

func (s *sqliteEnv) maxSequence(t testing.TB) int64 {
	t.Helper()
	var n int64
	if err := s.db.Reader().QueryRowContext(testCtx(t), `SELECT coalesce(max(sequence), 0) FROM history`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// outboxBodies maps event id to the body the live path publishes.
func (s *sqliteEnv) outboxBodies(t *testing.T) map[string][]byte {
	t.Helper()
	rows, err := s.db.Reader().QueryContext(testCtx(t), `SELECT event_id, payload FROM outbox`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	m := map[string][]byte{}
	for rows.Next() {
		var id, payload string
		if err := rows.Scan(&id, &payload); err != nil {
			t.Fatal(err)
		}
		m[id] = []byte(payload)
	}
	return m
}

func ids(events []*envelope.Event) []string {
	out := make([]string, len(events))
	for i, e := range events {
		out[i] = e.ID
	}
	return out
}

// A full replay from SQLite: every transition in sequence order, as the
// live path published it plus replay_id, between the markers, with counts
// that agree and a sequence cursor; nothing reaches a live or foreign queue.
func TestSQLiteFullReplay(t *testing.T) { onEachSQLite(t, testSQLiteFullReplay) }

func testSQLiteFullReplay(t *testing.T, s *sqliteEnv) {
	mine := s.observe(t, envelope.ReplayBinding("cat", "widget"))
	other := s.observe(t, envelope.LiveBinding("widget"), envelope.ReplayBinding("dog", "widget"),
		envelope.ReplayBinding("cat", "gadget"))
	r := s.start(t)

	var want []*envelope.Event
	for range 3 {
		w := uuid.NewString()
		want = append(want, s.commit(t, w, 1)...)
		want = append(want, s.commit(t, w, 2)...) // two transitions in one transaction
	}
	id := submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget"})
	got := mine.collect(t, id)
	if got.starts != 1 || got.started.ExpectedCount != int64(len(want)) || got.completed.Count != int64(len(want)) {
		t.Fatalf("started %+v (%d), completed %+v; want %d events", got.started, got.starts, got.completed, len(want))
	}
	if !slices.Equal(got.ids, ids(want)) {
		t.Fatalf("replayed %v, want %v (sequence order)", got.ids, ids(want))
	}
	all := mine.all()
	if first, last := all[0], all[len(all)-1]; first.RoutingKey != "cat.widget.replay_started" || last.RoutingKey != "cat.widget.replay_completed" {
		t.Fatalf("the markers do not bracket the events: first %q, last %q", first.RoutingKey, last.RoutingKey)
	}
	cur, err := replay.ParseCursor(got.completed.Cursor)
	if err != nil || !cur.IsSequence() || cur.Sequence != s.maxSequence(t) {
		t.Fatalf("cursor %q = %+v, %v; want the sequence cursor %d", got.completed.Cursor, cur, err, s.maxSequence(t))
	}
	live := s.outboxBodies(t)
	for i, d := range got.events {
		if d.RoutingKey != "cat.widget."+want[i].Event {
			t.Errorf("%s: routing key %q", d.MessageId, d.RoutingKey)
		}
		if !reflect.DeepEqual(jsonValue(t, d.Body), jsonValue(t, live[d.MessageId])) {
			t.Errorf("%s: body differs from the live one:\nreplay %s\nlive   %s", d.MessageId, d.Body, live[d.MessageId])
		}
		if d.Headers[envelope.HeaderReplayID] != id || d.Headers[envelope.HeaderCorrelationID] != want[i].CorrelationID ||
			d.ContentType != "application/json" || d.CorrelationId != want[i].CorrelationID {
			t.Errorf("%s: headers %v, content type %q, correlation id %q", d.MessageId, d.Headers, d.ContentType, d.CorrelationId)
		}
	}
	never(t, quietWindow, "a replayed event reached a live or foreign queue", func() bool { return other.n() != 0 })
	rec := waitStatus(t, r, id, replay.StatusDone)
	if rec.Count != int64(len(want)) || rec.Cursor != got.completed.Cursor || rec.Attempts != 1 ||
		rec.StartedAt == nil || rec.FinishedAt == nil || rec.FinishedAt.Before(*rec.StartedAt) || rec.RequestedAt.IsZero() {
		t.Fatalf("record %+v", rec)
	}
}

// latest sends the newest transition of each entity, by sequence; after a
// cursor, full and latest send only what that replay did not see.
func TestSQLiteLatestAndAfterCursor(t *testing.T) { onEachSQLite(t, testSQLiteLatestAndAfterCursor) }

func testSQLiteLatestAndAfterCursor(t *testing.T, s *sqliteEnv) {
	obs := s.observe(t, "#")
	r := s.start(t)
	w1, w2, w3 := uuid.NewString(), uuid.NewString(), uuid.NewString()
	var first []string
	for _, w := range []string{w1, w2, w3} {
		first = append(first, ids(s.commit(t, w, 2))...)
	}
	a := obs.collect(t, submit(t, r, replay.Request{Prefix: "a", EntityType: "widget"}))
	if !slices.Equal(a.ids, first) {
		t.Fatalf("replay A = %v, want %v", a.ids, first)
	}
	la := obs.collect(t, submit(t, r, replay.Request{Prefix: "a", EntityType: "widget", Mode: replay.Latest}))
	if want := []string{first[1], first[3], first[5]}; !slices.Equal(la.ids, want) || la.started.ExpectedCount != 3 {
		t.Fatalf("latest = %v (expected %d), want %v", la.ids, la.started.ExpectedCount, want)
	}
	if la.completed.Cursor != a.completed.Cursor {
		t.Fatalf("two replays of the same history: cursors %q and %q", a.completed.Cursor, la.completed.Cursor)
	}

	var second []*envelope.Event
	second = append(second, s.commit(t, w1, 1)...)
	second = append(second, s.commit(t, w3, 3)...)
	second = append(second, s.commit(t, w1, 1)...)
	second = append(second, s.commit(t, uuid.NewString(), 1)...)

	b := obs.collect(t, submit(t, r, replay.Request{Prefix: "b", EntityType: "widget", After: a.completed.Cursor}))
	if !slices.Equal(b.ids, ids(second)) || b.started.ExpectedCount != int64(len(second)) {
		t.Fatalf("replay after A = %v (expected_count %d), want exactly %v", b.ids, b.started.ExpectedCount, ids(second))
	}
	l := obs.collect(t, submit(t, r, replay.Request{Prefix: "b", EntityType: "widget", After: a.completed.Cursor, Mode: replay.Latest}))
	wantLatest := []string{second[3].ID, second[4].ID, second[5].ID} // w3 v5, w1 v4, w4 v1, by sequence
	if !slices.Equal(l.ids, wantLatest) || l.started.ExpectedCount != 3 {
		t.Fatalf("latest after A = %v (expected %d), want %v", l.ids, l.started.ExpectedCount, wantLatest)
	}
	for i, d := range l.events {
		ev, err := envelope.Decode(d.Body)
		if err != nil {
			t.Fatal(err)
		}
		if want := []int64{5, 4, 1}[i]; ev.Version != want {
			t.Errorf("%s: version %d, want %d", ev.EntityID, ev.Version, want)
		}
	}
	c := obs.collect(t, submit(t, r, replay.Request{Prefix: "c", EntityType: "widget", After: b.completed.Cursor}))
	if len(c.ids) != 0 || c.completed.Count != 0 || c.starts != 1 || c.started.ExpectedCount != 0 ||
		c.completed.Cursor != b.completed.Cursor {
		t.Fatalf("replay after B = %+v, want an empty replay with the same cursor", c)
	}
	g := obs.collect(t, submit(t, r, replay.Request{Prefix: "a", EntityType: "gadget"}))
	if g.completed.Count != 0 {
		t.Fatalf("gadget replay delivered %d widget events", g.completed.Count)
	}
}

// Requests a stopped or dead responder left behind are resumed from their
// pinned cursor, so they send exactly what the first attempt set out to
// send and nothing committed since; a running request with a fresh
// heartbeat waits until it goes stale.
func TestSQLiteResumesFromThePinnedCursor(t *testing.T) {
	onEachSQLite(t, testSQLiteResumesFromThePinnedCursor)
}

func testSQLiteResumesFromThePinnedCursor(t *testing.T, s *sqliteEnv) {
	obs := s.observe(t, "#")
	w := uuid.NewString()
	batch1 := s.commit(t, w, 3)
	pinned := replay.Cursor{Sequence: s.maxSequence(t)}.String()
	s.commit(t, w, 2)

	layout := "2006-01-02T15:04:05.000000Z"
	now := time.Now().UTC()
	hourAgo := now.Add(-time.Hour).Format(layout)
	pending, released, stale, fresh := uuid.NewString(), uuid.NewString(), uuid.NewString(), uuid.NewString()
	_, err := s.db.Writer().ExecContext(testCtx(t), `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, mode, status, "cursor", attempts, requested_at, started_at, heartbeat_at)
		VALUES (?, 'pend', 'widget', 'full', 'pending', NULL, 0, ?, NULL, NULL),
		       (?, 'rel', 'widget', 'full', 'pending', ?, 1, ?, ?, ?),
		       (?, 'stale', 'widget', 'full', 'running', ?, 1, ?, ?, ?),
		       (?, 'fresh', 'widget', 'full', 'running', NULL, 1, ?, ?, ?)`,
		pending, hourAgo,
		released, pinned, hourAgo, hourAgo, hourAgo,
		stale, pinned, hourAgo, hourAgo, hourAgo,
		fresh, hourAgo, now.Format(layout), now.Format(layout))
	if err != nil {
		t.Fatal(err)
	}
	const staleAfter = 2 * time.Second
	r := s.start(t, func(c *replay.Config) { c.Heartbeat = 200 * time.Millisecond; c.StaleAfter = staleAfter })

	if got := obs.collect(t, pending); got.completed.Count != 5 {
		t.Fatalf("pending request replayed %d events, want 5", got.completed.Count)
	}
	for _, id := range []string{released, stale} {
		got := obs.collect(t, id)
		if got.completed.Cursor != pinned || !slices.Equal(got.ids, ids(batch1)) || got.started.ExpectedCount != 3 {
			t.Fatalf("resumed request %s: cursor %q, events %v; want the pinned cursor and batch 1 %v",
				id, got.completed.Cursor, got.ids, ids(batch1))
		}
		if rec := waitStatus(t, r, id, replay.StatusDone); rec.Attempts != 2 || rec.Cursor != pinned {
			t.Fatalf("resumed request %+v: want 2 attempts and the pinned cursor", rec)
		}
	}
	rec := waitStatus(t, r, fresh, replay.StatusDone)
	if rec.FinishedAt.Sub(now) < staleAfter {
		t.Fatalf("a request with a fresh heartbeat was taken over after %s, before it went stale", rec.FinishedAt.Sub(now))
	}
	if got := obs.collect(t, fresh); got.completed.Count != 5 {
		t.Fatalf("taken-over request replayed %d events, want 5", got.completed.Count)
	}
}

// Submit is idempotent by replay_id on SQLite too; a cursor of PostgreSQL,
// or one beyond this history, is refused as a bad "after".
func TestSQLiteSubmit(t *testing.T) { onEachSQLite(t, testSQLiteSubmit) }

func testSQLiteSubmit(t *testing.T, s *sqliteEnv) {
	obs := s.observe(t, "#")
	r := s.start(t)
	s.commit(t, uuid.NewString(), 3)

	id := uuid.NewString()
	req := replay.Request{ReplayID: id, Prefix: "idem", EntityType: "widget"}
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for range 10 {
		wg.Go(func() {
			got, err := r.Submit(testCtx(t), req)
			if err == nil && got.ReplayID != id {
				err = errors.New("Submit returned another replay id: " + got.ReplayID)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Submit: %v", err)
		}
	}
	got := obs.collect(t, id)
	waitStatus(t, r, id, replay.StatusDone)
	again := req
	again.ReplayID = strings.ToUpper(id)
	if rec, err := r.Submit(testCtx(t), again); err != nil || rec.ReplayID != id {
		t.Fatalf("Submit of a finished replay = %+v, %v", rec, err)
	}
	if rec, err := r.Get(testCtx(t), strings.ToUpper(id)); err != nil || rec.ReplayID != id || rec.Attempts != 1 {
		t.Fatalf("Get in upper case = %+v, %v; want the replay, run once", rec, err)
	}
	never(t, quietWindow, "a duplicate request published again", func() bool {
		return obs.replayOf(t, id).starts != 1 || len(obs.replayOf(t, id).ids) != len(got.ids)
	})
	conflict := req
	conflict.Prefix = "other"
	if _, err := r.Submit(testCtx(t), conflict); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("another request under a used replay_id: %v, want a conflict", err)
	}
	if _, err := r.Get(testCtx(t), uuid.NewString()); apperr.CodeOf(err) != apperr.NotFound {
		t.Fatalf("Get of an unknown replay: %v", err)
	}

	for name, after := range map[string]string{
		"a PostgreSQL cursor":  replay.Cursor{Snapshot: "10:20:"}.String(),
		"beyond this history":  replay.Cursor{Sequence: s.maxSequence(t) + 1}.String(),
		"not a cursor":         "nope",
		"a negative sequence":  base64.RawURLEncoding.EncodeToString([]byte("sq1:-1")),
		"a padded sequence":    base64.RawURLEncoding.EncodeToString([]byte("sq1:01")),
		"an unknown kind":      base64.RawURLEncoding.EncodeToString([]byte("xx1:1")),
		"a sequence too large": base64.RawURLEncoding.EncodeToString([]byte("sq1:99999999999999999999")),
	} {
		bad := replay.Request{ReplayID: uuid.NewString(), Prefix: "idem", EntityType: "widget", After: after}
		_, err := r.Submit(testCtx(t), bad)
		var ae *apperr.Error
		if !errors.As(err, &ae) || ae.Code != apperr.Invalid || !strings.Contains(ae.Fields["after"], "is not a replay cursor") {
			t.Errorf("%s: %v, want invalid: after is not a replay cursor", name, err)
		}
		if _, err := r.Get(testCtx(t), bad.ReplayID); apperr.CodeOf(err) != apperr.NotFound {
			t.Errorf("%s: the refused request was recorded: %v", name, err)
		}
	}
	// The cursor of an empty history continues from the start.
	if _, err := r.Submit(testCtx(t), replay.Request{Prefix: "idem", EntityType: "widget",
		After: replay.Cursor{Sequence: 0}.String()}); err != nil {
		t.Fatalf("the cursor of an empty history: %v", err)
	}
}

// A PostgreSQL responder refuses the embedded store's cursors.
func TestPostgresRefusesASequenceCursor(t *testing.T) {
	t.Parallel()
	e := newEnvOn(t, true)
	r, err := replay.NewResponder(e.config())
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.Submit(testCtx(t), replay.Request{Prefix: "x", EntityType: "widget", After: replay.Cursor{Sequence: 1}.String()})
	var ae *apperr.Error
	if !errors.As(err, &ae) || ae.Code != apperr.Invalid || ae.Fields["after"] != "is not a replay cursor" {
		t.Fatalf("a sequence cursor on PostgreSQL: %v, want invalid: after is not a replay cursor", err)
	}
}

// Both kinds of cursor survive a round trip; PostgreSQL tokens keep their
// exact bytes (consumers store them).
func TestCursorTokens(t *testing.T) {
	t.Parallel()
	pg := replay.Cursor{Snapshot: "10:20:12,15"}
	if tok := pg.String(); tok != base64.RawURLEncoding.EncodeToString([]byte("pg1:10:20:12,15")) {
		t.Fatalf("PostgreSQL token %q changed", tok)
	}
	for _, c := range []replay.Cursor{pg, {Snapshot: "1:1:"}, {Sequence: 0}, {Sequence: 42}, {Sequence: 1<<63 - 1}} {
		got, err := replay.ParseCursor(c.String())
		if err != nil || got != c {
			t.Errorf("ParseCursor(%v.String()) = %+v, %v", c, got, err)
		}
	}
	if tok := (replay.Cursor{Sequence: 42}).String(); tok != base64.RawURLEncoding.EncodeToString([]byte("sq1:42")) {
		t.Errorf("sequence token %q", tok)
	}
}

// Exactly one store.
func TestSQLiteConfigValidate(t *testing.T) {
	t.Parallel()
	s := newSQLiteEnv(t, "file", true)
	if _, err := replay.NewResponder(s.config()); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	pg := newEnvOn(t, true)
	for name, c := range map[string]replay.Config{
		"no store":   s.config(func(c *replay.Config) { c.SQLite = nil }),
		"two stores": s.config(func(c *replay.Config) { c.Pool = pg.pool }),
	} {
		if _, err := replay.NewResponder(c); err == nil || !strings.Contains(err.Error(), "SQLite") {
			t.Errorf("%s: NewResponder = %v, want an error naming both stores", name, err)
		}
	}
}

// A replay of thousands of events from SQLite streams: the live heap stays
// far below what the events weigh. On RabbitMQ, so that only the
// responder's memory is measured (the in-process broker holds queued
// messages in this process).
func TestSQLiteReplayBoundedMemory(t *testing.T) {
	// Not parallel: the heap measurement needs the process to itself.
	const n = 5000
	s := newSQLiteEnv(t, "file", false)
	s.bulk(t, n, 1024)
	var bytes int64
	if err := s.db.Reader().QueryRowContext(testCtx(t), `SELECT sum(length(attributes) + 300) FROM history`).Scan(&bytes); err != nil {
		t.Fatal(err)
	}
	obs := s.observeWith(t, false, envelope.ReplayBinding("bench", "widget"))
	r := s.start(t, func(c *replay.Config) { c.Workers = 1 })

	base := liveHeap()()
	stop := liveHeap()
	id := submit(t, r, replay.Request{Prefix: "bench", EntityType: "widget"})
	rec := waitStatus(t, r, id, replay.StatusDone)
	peak := stop()
	eventually(t, waitLong, "every replayed message", func() bool { return obs.n() == n+2 })
	if rec.Count != n {
		t.Fatalf("count %d, want %d", rec.Count, n)
	}
	took := rec.FinishedAt.Sub(*rec.StartedAt)
	t.Logf("replayed %d events (~%d MiB) from SQLite in %s: %.0f events/s; live heap %d MiB at rest, peak %d MiB",
		n, bytes>>20, took.Round(time.Millisecond), float64(n)/took.Seconds(), base>>20, peak>>20)
	if growth := int64(peak) - int64(base); growth > bytes/2 {
		t.Fatalf("live heap grew by %d MiB during a replay of %d MiB: rows are not streamed", growth>>20, bytes>>20)
	}
	// Latest over the same history: one per entity.
	l := submit(t, r, replay.Request{Prefix: "bench", EntityType: "widget", Mode: replay.Latest})
	if rec := waitStatus(t, r, l, replay.StatusDone); rec.Count != n/5 {
		t.Fatalf("latest count %d, want %d", rec.Count, n/5)
	}
}
