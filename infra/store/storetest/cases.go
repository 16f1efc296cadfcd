package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/store"
)

const entityType = "widget"

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// event is a transition of a widget; its attributes exercise nesting,
// unicode and numbers.
func event(id string, version int64, name, from, to string) *envelope.Event {
	return &envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		EntityType:    entityType,
		EntityID:      id,
		Version:       version,
		Event:         name,
		From:          from,
		To:            to,
		Attributes: json.RawMessage(fmt.Sprintf(
			`{"id":%q,"state":%q,"size":%d,"price":12.5,"label":"grüße \"quoted\"","tags":["a","b"],"dims":{"w":1,"h":null}}`,
			id, to, version)),
		OccurredAt:    time.Now(),
		CorrelationID: "corr-" + id[:8],
	}
}

// newWidget commits a fresh widget and returns its id.
func newWidget[T Tx](t *testing.T, h Harness[T]) string {
	t.Helper()
	id := uuid.NewString()
	if err := h.Store.InTx(testCtx(t), func(ctx context.Context, tx T) error { return h.Widgets.Insert(ctx, tx, id) }); err != nil {
		t.Fatalf("insert widget: %v", err)
	}
	return id
}

// command is what a command handler does: lock the entity, read it, save
// its new state, append the transitions.
func command[T Tx](ctx context.Context, h Harness[T], tx T, id string, events ...*envelope.Event) error {
	if err := tx.LockEntity(ctx, entityType, id); err != nil {
		return err
	}
	if _, _, err := h.Widgets.Load(ctx, tx, id); err != nil {
		return err
	}
	last := events[len(events)-1]
	if err := h.Widgets.Save(ctx, tx, id, last.To, last.Version); err != nil {
		return err
	}
	return tx.Append(ctx, events...)
}

func run[T Tx](t *testing.T, h Harness[T], id string, events ...*envelope.Event) {
	t.Helper()
	if err := h.Store.InTx(testCtx(t), func(ctx context.Context, tx T) error { return command(ctx, h, tx, id, events...) }); err != nil {
		t.Fatalf("InTx: %v", err)
	}
}

func history[T Tx](t *testing.T, h Harness[T], id string) []envelope.Event {
	t.Helper()
	got, err := h.Store.History(testCtx(t), entityType, id)
	if err != nil {
		t.Fatalf("History: %v", err)
	}
	return got
}

func outbox[T Tx](t *testing.T, h Harness[T]) []OutboxRow {
	t.Helper()
	rows, err := h.Outbox(testCtx(t))
	if err != nil {
		t.Fatalf("Outbox: %v", err)
	}
	return rows
}

func widget[T Tx](t *testing.T, h Harness[T], id string) (string, int64) {
	t.Helper()
	state, version, found, err := h.Widgets.Get(testCtx(t), id)
	if err != nil || !found {
		t.Fatalf("widget %s: found %v, %v", id, found, err)
	}
	return state, version
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

// sameEvent compares every field: attributes as JSON, occurred_at as an
// instant that must be in UTC.
func sameEvent(t *testing.T, got, want envelope.Event) error {
	t.Helper()
	if !sameJSON(t, got.Attributes, want.Attributes) {
		return fmt.Errorf("attributes %s, want %s", got.Attributes, want.Attributes)
	}
	if !got.OccurredAt.Equal(want.OccurredAt) || got.OccurredAt.Location() != time.UTC {
		return fmt.Errorf("occurred_at %v, want %v in UTC", got.OccurredAt, want.OccurredAt)
	}
	got.Attributes, want.Attributes = nil, nil
	got.OccurredAt, want.OccurredAt = time.Time{}, time.Time{}
	if !reflect.DeepEqual(got, want) {
		return fmt.Errorf("\n got %+v\nwant %+v", got, want)
	}
	return nil
}

func testHistoryRoundTrip[T Tx](t *testing.T, h Harness[T]) {
	a, b := newWidget(t, h), newWidget(t, h)
	odd := event(a, 3, "empty", "full", "empty")
	// Nanoseconds and another zone: the store keeps microseconds in UTC
	// and must say so in the event it was handed.
	odd.OccurredAt = time.Date(2026, 11, 28, 11, 0, 0, 123456789, time.FixedZone("CET", 3600))
	steps := []struct {
		id     string
		events []*envelope.Event
	}{
		{a, []*envelope.Event{event(a, 1, "create", "initialized", "created"), event(a, 2, "fill", "created", "full")}},
		{b, []*envelope.Event{event(b, 1, "create", "initialized", "created")}},
		{a, []*envelope.Event{odd}},
		{b, []*envelope.Event{event(b, 2, "fill", "created", "full")}},
	}
	var all, ofA []*envelope.Event
	for _, st := range steps {
		run(t, h, st.id, st.events...)
		all = append(all, st.events...)
		if st.id == a {
			ofA = append(ofA, st.events...)
		}
	}

	for i, e := range all {
		if e.Sequence <= 0 {
			t.Fatalf("event %d: Append left Sequence at %d", i, e.Sequence)
		}
		if i > 0 && e.Sequence <= all[i-1].Sequence {
			t.Fatalf("sequences of successive appends not increasing: %d then %d", all[i-1].Sequence, e.Sequence)
		}
		if e.OccurredAt.Location() != time.UTC || e.OccurredAt.Nanosecond()%1000 != 0 {
			t.Errorf("event %d: Append left occurred_at %v, want UTC at microsecond precision", i, e.OccurredAt)
		}
	}
	if want := time.Date(2026, 11, 28, 10, 0, 0, 123456000, time.UTC); !odd.OccurredAt.Equal(want) {
		t.Errorf("Append brought %v to %v, want %v (truncated, not rounded)", "11:00:00.123456789+01:00", odd.OccurredAt, want)
	}

	got := history(t, h, a)
	if len(got) != len(ofA) {
		t.Fatalf("History returned %d events, want %d", len(got), len(ofA))
	}
	for i, g := range got {
		if g.Version != int64(i+1) {
			t.Errorf("event %d has version %d: not in version order", i, g.Version)
		}
		if err := sameEvent(t, g, *ofA[i]); err != nil {
			t.Errorf("History event %d: %v", i, err)
		}
	}
	if state, version := widget(t, h, a); state != "empty" || version != 3 {
		t.Errorf("widget a = %s v%d, want empty v3", state, version)
	}
	if none := history(t, h, uuid.NewString()); len(none) != 0 {
		t.Errorf("History of an unknown entity = %v, want empty", none)
	}
	other, err := h.Store.History(testCtx(t), "gadget", a)
	if err != nil || len(other) != 0 {
		t.Errorf("History of another entity type = %v, %v; want empty", other, err)
	}
}

// nothingWritten fails unless id has no history, the outbox is empty and
// the widget is still as created.
func nothingWritten[T Tx](t *testing.T, h Harness[T], id string) {
	t.Helper()
	if got := history(t, h, id); len(got) != 0 {
		t.Errorf("history rows = %d after a rolled-back transaction, want 0", len(got))
	}
	if rows := outbox(t, h); len(rows) != 0 {
		t.Errorf("outbox rows = %d after a rolled-back transaction, want 0", len(rows))
	}
	if state, version := widget(t, h, id); state != "initialized" || version != 0 {
		t.Errorf("widget = %s v%d after a rolled-back transaction, want initialized v0", state, version)
	}
}

func testFnErrorRollsBack[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	id := newWidget(t, h)
	boom := errors.New("boom")
	err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		if err := command(ctx, h, tx, id,
			event(id, 1, "create", "initialized", "created"), event(id, 2, "fill", "created", "full")); err != nil {
			return err
		}
		if err := tx.Remember(ctx, "rolled-back-key", store.Outcome{Fingerprint: "f", Response: json.RawMessage(`{}`)}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("InTx = %v, want fn's error", err)
	}
	if code := apperr.CodeOf(err); code != apperr.Internal {
		t.Errorf("fn's plain error became %s", code)
	}
	nothingWritten(t, h, id)
	if _, found, err := h.Store.Recall(ctx, "rolled-back-key"); err != nil || found {
		t.Errorf("Recall after rollback: found %v, %v; want not found", found, err)
	}

	// A coded error keeps its code (the HTTP status depends on it).
	err = h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		if err := command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created")); err != nil {
			return err
		}
		return fmt.Errorf("guard: %w", apperr.Errorf(apperr.Conflict, "discontinued"))
	})
	if code := apperr.CodeOf(err); code != apperr.Conflict {
		t.Fatalf("InTx = %v (code %s), want the fn's Conflict", err, code)
	}
	nothingWritten(t, h, id)

	// A transaction that fails leaves the store usable.
	run(t, h, id, event(id, 1, "create", "initialized", "created"))
	if got := history(t, h, id); len(got) != 1 {
		t.Fatalf("history rows = %d after a good command, want 1", len(got))
	}
}

func testDuplicateVersion[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	id := newWidget(t, h)
	first := event(id, 1, "create", "initialized", "created")
	run(t, h, id, first)

	// The duplicate comes after a good row in the same transaction: that
	// row must not survive either.
	err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		return command(ctx, h, tx, id, event(id, 2, "fill", "created", "full"), event(id, 1, "create", "initialized", "created"))
	})
	if err == nil {
		t.Fatal("appending a version that exists succeeded")
	}
	if !h.IsDuplicateVersion(err) {
		t.Errorf("IsDuplicateVersion(%v) = false", err)
	}
	if h.IsDuplicateVersion(errors.New("some other failure")) || h.IsDuplicateVersion(nil) {
		t.Error("IsDuplicateVersion matched an error that is not a violation")
	}
	if code := apperr.CodeOf(err); code == apperr.Unavailable {
		t.Errorf("a constraint violation was classified as %s: clients would retry it forever", code)
	}

	// An event id is unique too: a second row with it is refused.
	reused := event(id, 2, "fill", "created", "full")
	reused.ID = first.ID
	if err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error { return command(ctx, h, tx, id, reused) }); err == nil {
		t.Fatal("appending a second event with an existing event id succeeded")
	}

	got := history(t, h, id)
	if len(got) != 1 || got[0].ID != first.ID {
		t.Fatalf("history = %+v, want only the first committed event", got)
	}
	if rows := outbox(t, h); len(rows) != 1 || rows[0].MessageID != first.ID {
		t.Fatalf("outbox = %d rows, want only the first committed event's", len(rows))
	}
	if state, version := widget(t, h, id); state != "created" || version != 1 {
		t.Fatalf("widget = %s v%d, want the failed transactions' updates rolled back (created v1)", state, version)
	}
}

func testOutbox[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	a, b, c := newWidget(t, h), newWidget(t, h), newWidget(t, h)
	var committed []*envelope.Event
	for _, st := range []struct {
		id     string
		events []*envelope.Event
	}{
		{a, []*envelope.Event{event(a, 1, "create", "initialized", "created")}},
		{b, []*envelope.Event{event(b, 1, "create", "initialized", "created"), event(b, 2, "fill", "created", "full")}},
		{c, []*envelope.Event{event(c, 1, "create", "initialized", "created")}},
		{a, []*envelope.Event{event(a, 2, "fill", "created", "full"), event(a, 3, "empty", "full", "empty")}},
		{b, []*envelope.Event{event(b, 3, "empty", "full", "empty")}},
	} {
		run(t, h, st.id, st.events...)
		committed = append(committed, st.events...)
	}
	// A transaction that changes only the domain's tables writes no row.
	if err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		return h.Widgets.Save(ctx, tx, c, "created", 1)
	}); err != nil {
		t.Fatal(err)
	}

	stored := map[string]envelope.Event{}
	for _, id := range []string{a, b, c} {
		for _, e := range history(t, h, id) {
			stored[e.ID] = e
		}
	}
	rows := outbox(t, h)
	if len(rows) != len(committed) {
		t.Fatalf("outbox rows = %d, want one per event: %d", len(rows), len(committed))
	}
	for i, row := range rows {
		e := committed[i]
		if row.MessageID != e.ID {
			t.Fatalf("outbox row %d is event %s, want %s (v%d of %s): not in commit order", i, row.MessageID, e.ID, e.Version, e.EntityID)
		}
		if row.RoutingKey != e.RoutingKey() {
			t.Errorf("outbox row %d routing key %q, want %q", i, row.RoutingKey, e.RoutingKey())
		}
		if row.Metadata[envelope.HeaderCorrelationID] != e.CorrelationID || row.Metadata[envelope.HeaderSchemaVersion] != "1" {
			t.Errorf("outbox row %d headers %v, want correlation_id %q and schema_version 1", i, row.Metadata, e.CorrelationID)
		}
		live, err := envelope.Decode(row.Payload)
		if err != nil {
			t.Fatalf("outbox row %d: payload is not an event: %v: %s", i, err, row.Payload)
		}
		if err := sameEvent(t, live, *e); err != nil {
			t.Errorf("outbox row %d payload differs from the appended event: %v", i, err)
		}
		// A replay publishes the stored event: it must equal the live one.
		if err := sameEvent(t, live, stored[e.ID]); err != nil {
			t.Errorf("outbox row %d payload differs from history: %v", i, err)
		}
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(row.Payload, &raw); err != nil {
			t.Fatal(err)
		}
		for _, field := range []string{"id", "schema_version", "sequence", "entity_type", "entity_id", "version",
			"event", "from", "to", "entity_attributes", "occurred_at", "correlation_id"} {
			if _, ok := raw[field]; !ok {
				t.Errorf("outbox row %d payload lacks %q: %s", i, field, row.Payload)
			}
		}
		if at := string(raw["occurred_at"]); !strings.HasSuffix(at, `Z"`) {
			t.Errorf("outbox row %d occurred_at %s is not UTC", i, at)
		}
	}
}

func testIdempotency[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	const key = "idem-1"
	first := store.Outcome{Fingerprint: "fp-1", Response: json.RawMessage(`{"id":"x","version":1,"name":"grüße"}`)}
	if _, found, err := h.Store.Recall(ctx, key); err != nil || found {
		t.Fatalf("Recall of a new key: found %v, %v", found, err)
	}

	id := newWidget(t, h)
	err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		if _, found, err := tx.Recall(ctx, key); err != nil || found {
			return fmt.Errorf("tx.Recall of a new key: found %v, %v", found, err)
		}
		if err := command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created")); err != nil {
			return err
		}
		return tx.Remember(ctx, key, first)
	})
	if err != nil {
		t.Fatal(err)
	}
	got, found, err := h.Store.Recall(ctx, key)
	if err != nil || !found {
		t.Fatalf("Recall after commit: found %v, %v", found, err)
	}
	if got.Fingerprint != first.Fingerprint || !sameJSON(t, got.Response, first.Response) {
		t.Fatalf("Recall = %+v, want %+v", got, first)
	}

	// A retry inside a command finds it and fires nothing.
	err = h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		o, found, err := tx.Recall(ctx, key)
		if err != nil || !found || o.Fingerprint != first.Fingerprint || !sameJSON(t, o.Response, first.Response) {
			return fmt.Errorf("tx.Recall of a committed key = %+v, %v, %v", o, found, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// The key is taken: a second outcome is refused and the first stays.
	err = h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		return tx.Remember(ctx, key, store.Outcome{Fingerprint: "fp-2", Response: json.RawMessage(`{}`)})
	})
	if err == nil {
		t.Fatal("Remember of a recorded key succeeded")
	}
	if code := apperr.CodeOf(err); code == apperr.Unavailable {
		t.Errorf("a duplicate key was classified as %s", code)
	}
	if got, _, _ := h.Store.Recall(ctx, key); got.Fingerprint != first.Fingerprint {
		t.Fatalf("the first outcome was replaced by %+v", got)
	}
	if _, found, err := h.Store.Recall(ctx, "idem-other"); err != nil || found {
		t.Fatalf("Recall of another key: found %v, %v", found, err)
	}
	if got := history(t, h, id); len(got) != 1 {
		t.Fatalf("history rows = %d, want 1: a recalled command fired", len(got))
	}
}

// Concurrent retries of one request: exactly one fires, the others find its
// outcome once it commits.
func testIdempotencyConcurrent[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	const key, workers = "idem-race", 8
	id := newWidget(t, h)
	var (
		mu       sync.Mutex
		fired    int
		recalled int
		wg       sync.WaitGroup
	)
	errs := make(chan error, workers)
	start := make(chan struct{})
	for range workers {
		wg.Go(func() {
			<-start
			var didFire, didRecall bool
			err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
				didFire, didRecall = false, false
				if _, found, err := tx.Recall(ctx, key); err != nil || found {
					didRecall = found
					return err
				}
				if err := tx.LockEntity(ctx, entityType, id); err != nil {
					return err
				}
				_, version, err := h.Widgets.Load(ctx, tx, id)
				if err != nil {
					return err
				}
				if err := h.Widgets.Save(ctx, tx, id, "created", version+1); err != nil {
					return err
				}
				if err := tx.Append(ctx, event(id, version+1, "create", "initialized", "created")); err != nil {
					return err
				}
				didFire = true
				return tx.Remember(ctx, key, store.Outcome{Fingerprint: "fp", Response: json.RawMessage(`{"ok":true}`)})
			})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if didFire {
				fired++
			}
			if didRecall {
				recalled++
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("a retry failed: %v", err)
	}
	if fired != 1 || recalled != workers-1 {
		t.Fatalf("%d retries fired and %d recalled, want 1 and %d", fired, recalled, workers-1)
	}
	if got := history(t, h, id); len(got) != 1 {
		t.Fatalf("history rows = %d, want 1", len(got))
	}
}

// Commands racing on one entity: LockEntity first, then read the version,
// then write the next. No lost update, no duplicate version, and the
// outbox (publishing order) follows version order.
func testConcurrentCommands[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	const workers, commands = 8, 50
	id := newWidget(t, h)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := make(chan struct{})
	for range workers {
		wg.Go(func() {
			<-start
			for range commands {
				err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
					if err := tx.LockEntity(ctx, entityType, id); err != nil {
						return err
					}
					state, version, err := h.Widgets.Load(ctx, tx, id)
					if err != nil {
						return err
					}
					next := fmt.Sprintf("s%d", version+1)
					if err := h.Widgets.Save(ctx, tx, id, next, version+1); err != nil {
						return err
					}
					return tx.Append(ctx, event(id, version+1, "step", state, next))
				})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a command failed: %v", err)
	}

	const total = workers * commands
	got := history(t, h, id)
	if len(got) != total {
		t.Fatalf("history rows = %d, want %d", len(got), total)
	}
	prev := "initialized"
	for i, e := range got {
		if e.Version != int64(i+1) {
			t.Fatalf("history position %d has version %d: gap or duplicate", i, e.Version)
		}
		if e.From != prev {
			t.Fatalf("version %d fired from %q, but version %d left %q: a lost update", e.Version, e.From, e.Version-1, prev)
		}
		prev = e.To
	}
	if state, version := widget(t, h, id); version != total || state != prev {
		t.Fatalf("widget = %s v%d, want %s v%d", state, version, prev, total)
	}
	var versions []int64
	for _, row := range outbox(t, h) {
		e, err := envelope.Decode(row.Payload)
		if err != nil {
			t.Fatal(err)
		}
		if e.EntityID == id {
			versions = append(versions, e.Version)
		}
	}
	if len(versions) != total {
		t.Fatalf("outbox rows of the widget = %d, want %d", len(versions), total)
	}
	inversions := 0
	for i := 1; i < len(versions); i++ {
		if versions[i] < versions[i-1] {
			inversions++
		}
	}
	if inversions != 0 {
		t.Fatalf("%d outbox rows come before a smaller version: the relay would publish out of per-entity order", inversions)
	}
}

func testCancelledContext[T Tx](t *testing.T, h Harness[T]) {
	id := newWidget(t, h)

	// Cancelled between two statements.
	ctx, cancel := context.WithCancel(testCtx(t))
	err := h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		if err := command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created")); err != nil {
			return err
		}
		cancel()
		return tx.Append(ctx, event(id, 2, "fill", "created", "full"))
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("InTx cancelled mid-transaction = %v, want context.Canceled", err)
	}
	nothingWritten(t, h, id)

	// Cancelled after fn's last statement: the commit must not happen.
	ctx, cancel = context.WithCancel(testCtx(t))
	err = h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
		if err := command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created")); err != nil {
			return err
		}
		cancel()
		return nil
	})
	if err == nil {
		t.Fatal("InTx committed although its context was cancelled before the commit")
	}
	nothingWritten(t, h, id)

	// Cancelled before: fn never runs.
	ctx, cancel = context.WithCancel(testCtx(t))
	cancel()
	called := false
	err = h.Store.InTx(ctx, func(context.Context, T) error { called = true; return nil })
	if err == nil || called {
		t.Fatalf("InTx with a cancelled context: err %v, fn called %v; want an error and no call", err, called)
	}

	// The store still works.
	run(t, h, id, event(id, 1, "create", "initialized", "created"))
	if got := history(t, h, id); len(got) != 1 {
		t.Fatalf("history rows = %d after a good command, want 1", len(got))
	}
}

// A command stuck behind another on the same entity gives up at its own
// deadline as unavailable (503), never hangs, and writes nothing.
func testBlockedCommandDeadline[T Tx](t *testing.T, h Harness[T]) {
	ctx := testCtx(t)
	id := newWidget(t, h)
	holding := make(chan struct{})
	release := make(chan struct{})
	holder := make(chan error, 1)
	go func() {
		holder <- h.Store.InTx(ctx, func(ctx context.Context, tx T) error {
			if err := command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created")); err != nil {
				return err
			}
			close(holding)
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	select {
	case <-holding:
	case err := <-holder:
		t.Fatalf("the holding command ended early: %v", err)
	case <-ctx.Done():
		t.Fatal("the holding command never took its lock")
	}

	const deadline = 300 * time.Millisecond
	wctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	start := time.Now()
	err := h.Store.InTx(wctx, func(ctx context.Context, tx T) error {
		return command(ctx, h, tx, id, event(id, 1, "create", "initialized", "created"))
	})
	elapsed := time.Since(start)
	close(release)
	if err == nil {
		t.Fatal("a command blocked behind another succeeded before the other committed")
	}
	if code := apperr.CodeOf(err); code != apperr.Unavailable {
		t.Errorf("blocked command = %v (code %s), want %s", err, code, apperr.Unavailable)
	}
	if elapsed > deadline+2*time.Second {
		t.Errorf("blocked command returned after %v, want about its %v deadline", elapsed, deadline)
	}
	if err := <-holder; err != nil {
		t.Fatalf("holding command: %v", err)
	}
	if got := history(t, h, id); len(got) != 1 {
		t.Fatalf("history rows = %d, want only the holder's", len(got))
	}
}

func testUnreachable[T Tx](t *testing.T, h Harness[T]) {
	s := h.Unreachable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	called := false
	err := s.InTx(ctx, func(context.Context, T) error { called = true; return nil })
	if err == nil || called {
		t.Fatalf("InTx on an unreachable store: err %v, fn called %v", err, called)
	}
	if code := apperr.CodeOf(err); code != apperr.Unavailable {
		t.Errorf("InTx = %v (code %s), want %s", err, code, apperr.Unavailable)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("InTx took %v to report an unreachable store", elapsed)
	}
	if _, err := s.History(ctx, entityType, uuid.NewString()); apperr.CodeOf(err) != apperr.Unavailable {
		t.Errorf("History = %v, want %s", err, apperr.Unavailable)
	}
	if _, _, err := s.Recall(ctx, "k"); apperr.CodeOf(err) != apperr.Unavailable {
		t.Errorf("Recall = %v, want %s", err, apperr.Unavailable)
	}
}
