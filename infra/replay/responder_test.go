package replay_test

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/replay"
)

// startRelay publishes the outbox live, as the producing service does.
func (e *env) startRelay(t *testing.T) {
	t.Helper()
	conn, err := broker.Connect(e.amqpURL, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	pub, err := broker.NewPublisher(conn, broker.PublisherConfig{Exchange: e.topo.EventsExchange}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	relay, err := outbox.NewForwarderRelay(outbox.Config{Pool: openPool(t, e.dbURL, 2), Publisher: pub, Topic: pgstore.OutboxTopic})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("relay did not stop")
		}
		_ = relay.Close()
	})
	select {
	case <-relay.Running():
	case err := <-done:
		t.Fatalf("relay stopped: %v", err)
	case <-time.After(waitLong):
		t.Fatal("relay did not start")
	}
}

func jsonValue(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return v
}

// Every history event reaches the prefix's queue as the very event the live
// path published (message id, body, headers, properties) plus replay_id,
// between the two markers, in sequence order; no live consumer and no other
// prefix receives any of it.
func TestReplayIsTheLiveEventsUnderThePrefix(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startRelay(t)
	live := e.observe(t, envelope.LiveBinding("widget"))
	mine := e.observe(t, envelope.ReplayBinding("cat", "widget"))
	other := e.observe(t, envelope.ReplayBinding("dog", "widget"), envelope.ReplayBinding("cat", "gadget"))
	r := e.start(t)

	var want []*envelope.Event
	for range 3 {
		id := e.newWidget(t)
		want = append(want, e.commit(t, id, 1)...)
		want = append(want, e.commit(t, id, 2)...) // two transitions in one transaction
	}
	eventually(t, waitLong, "the live events", func() bool { return live.n() == len(want) })
	liveByID := map[string]amqp091.Delivery{}
	for _, d := range live.all() {
		liveByID[d.MessageId] = d
	}

	id := submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget"})
	got := mine.collect(t, id)
	if got.starts != 1 || got.started.ReplayID != id || got.started.ExpectedCount != int64(len(want)) {
		t.Fatalf("replay_started = %+v (%d of them), want expected_count %d", got.started, got.starts, len(want))
	}
	if got.completed.Count != int64(len(want)) || len(got.events) != len(want) {
		t.Fatalf("replay_completed count %d, %d events delivered; want %d", got.completed.Count, len(got.events), len(want))
	}
	if _, err := replay.ParseCursor(got.completed.Cursor); err != nil {
		t.Fatalf("completed cursor %q: %v", got.completed.Cursor, err)
	}
	all := mine.all()
	if first, last := all[0], all[len(all)-1]; first.RoutingKey != "cat.widget.replay_started" || last.RoutingKey != "cat.widget.replay_completed" {
		t.Fatalf("the markers do not bracket the events: first %q, last %q", first.RoutingKey, last.RoutingKey)
	}

	var lastSeq int64
	for i, d := range got.events {
		ld, ok := liveByID[d.MessageId]
		if !ok {
			t.Fatalf("replayed message %s was never published live", d.MessageId)
		}
		if d.MessageId != want[i].ID {
			t.Errorf("replayed #%d is %s, want %s (sequence order)", i, d.MessageId, want[i].ID)
		}
		if d.RoutingKey != "cat."+ld.RoutingKey {
			t.Errorf("%s: routing key %q, live %q", d.MessageId, d.RoutingKey, ld.RoutingKey)
		}
		if !reflect.DeepEqual(jsonValue(t, d.Body), jsonValue(t, ld.Body)) {
			t.Errorf("%s: body differs from live:\nreplay %s\nlive   %s", d.MessageId, d.Body, ld.Body)
		}
		ev, err := envelope.Decode(d.Body)
		if err != nil {
			t.Fatalf("replayed body does not decode: %v", err)
		}
		if ev.Sequence <= lastSeq {
			t.Errorf("sequence %d after %d", ev.Sequence, lastSeq)
		}
		lastSeq = ev.Sequence
		if d.Headers[envelope.HeaderReplayID] != id {
			t.Errorf("%s: replay_id header %#v", d.MessageId, d.Headers[envelope.HeaderReplayID])
		}
		headers := maps(d.Headers)
		delete(headers, envelope.HeaderReplayID)
		if !reflect.DeepEqual(headers, maps(ld.Headers)) {
			t.Errorf("%s: headers %v, live %v (plus replay_id)", d.MessageId, headers, ld.Headers)
		}
		if d.ContentType != ld.ContentType || d.DeliveryMode != ld.DeliveryMode || d.CorrelationId != ld.CorrelationId ||
			d.ContentType != "application/json" || d.DeliveryMode != amqp091.Persistent {
			t.Errorf("%s: properties %q %d %q, live %q %d %q", d.MessageId, d.ContentType, d.DeliveryMode, d.CorrelationId,
				ld.ContentType, ld.DeliveryMode, ld.CorrelationId)
		}
	}

	// Replayed messages were confirmed, so routed, before replay_completed
	// was published: a live consumer or another prefix would have them by now.
	never(t, quietWindow, "a replayed event reached a live or foreign queue", func() bool {
		return live.n() != len(want) || other.n() != 0
	})
	rec := waitStatus(t, r, id, replay.StatusDone)
	if rec.Count != int64(len(want)) || rec.Cursor != got.completed.Cursor || rec.Attempts != 1 || rec.FinishedAt == nil {
		t.Fatalf("record %+v", rec)
	}
}

func maps(t amqp091.Table) map[string]any {
	m := make(map[string]any, len(t))
	for k, v := range t {
		m[k] = v
	}
	return m
}

// after = a replay's cursor replays exactly what that replay's snapshot did
// not see; full and latest both honour it.
func TestReplayAfterCursor(t *testing.T) { onEachBroker(t, testReplayAfterCursor) }

func testReplayAfterCursor(t *testing.T, e *env) {
	obs := e.observe(t, "#")
	r := e.start(t)
	w1, w2, w3 := e.newWidget(t), e.newWidget(t), e.newWidget(t)
	var first []string
	for _, w := range []string{w1, w2, w3} {
		for _, ev := range e.commit(t, w, 2) {
			first = append(first, ev.ID)
		}
	}
	a := obs.collect(t, submit(t, r, replay.Request{Prefix: "a", EntityType: "widget"}))
	if !slices.Equal(a.ids, first) {
		t.Fatalf("replay A = %v, want %v", a.ids, first)
	}

	var second []*envelope.Event
	second = append(second, e.commit(t, w1, 1)...)
	second = append(second, e.commit(t, w3, 3)...)
	second = append(second, e.commit(t, w1, 1)...)
	w4 := e.newWidget(t)
	second = append(second, e.commit(t, w4, 1)...)
	var secondIDs []string
	for _, ev := range second {
		secondIDs = append(secondIDs, ev.ID)
	}

	b := obs.collect(t, submit(t, r, replay.Request{Prefix: "b", EntityType: "widget", After: a.completed.Cursor}))
	if !slices.Equal(b.ids, secondIDs) || b.started.ExpectedCount != int64(len(second)) {
		t.Fatalf("replay after A = %v (expected_count %d), want exactly %v", b.ids, b.started.ExpectedCount, secondIDs)
	}
	// latest after A: the newest of each entity changed since A.
	l := obs.collect(t, submit(t, r, replay.Request{Prefix: "b", EntityType: "widget", After: a.completed.Cursor, Mode: replay.Latest}))
	wantLatest := []string{second[3].ID, second[4].ID, second[5].ID} // w3 v5, w1 v4, w4 v1, by sequence
	if !slices.Equal(l.ids, wantLatest) {
		t.Fatalf("latest after A = %v, want %v", l.ids, wantLatest)
	}
	// Nothing happened since B: an empty replay, still with both markers.
	c := obs.collect(t, submit(t, r, replay.Request{Prefix: "c", EntityType: "widget", After: b.completed.Cursor}))
	if len(c.ids) != 0 || c.completed.Count != 0 || c.starts != 1 || c.started.ExpectedCount != 0 {
		t.Fatalf("replay after B = %+v, want an empty replay", c)
	}
	// Replays of another entity type see none of it.
	g := obs.collect(t, submit(t, r, replay.Request{Prefix: "a", EntityType: "gadget"}))
	if g.completed.Count != 0 {
		t.Fatalf("gadget replay delivered %d widget events", g.completed.Count)
	}
}

// latest sends only the newest transition of each entity, by sequence.
func TestReplayLatest(t *testing.T) { onEachBroker(t, testReplayLatest) }

func testReplayLatest(t *testing.T, e *env) {
	obs := e.observe(t, envelope.ReplayBinding("view", "widget"))
	r := e.start(t)
	w1, w2, w3 := e.newWidget(t), e.newWidget(t), e.newWidget(t)
	e.commit(t, w1, 2)
	e.commit(t, w3, 1)
	w1last := e.commit(t, w1, 1)[0]
	w2last := e.commit(t, w2, 1)[0]
	e.commit(t, w3, 3)
	w3last := e.commit(t, w3, 1)[0]

	got := obs.collect(t, submit(t, r, replay.Request{Prefix: "view", EntityType: "widget", Mode: replay.Latest}))
	want := []string{w1last.ID, w2last.ID, w3last.ID}
	if !slices.Equal(got.ids, want) || got.started.ExpectedCount != 3 {
		t.Fatalf("latest = %v (expected %d), want %v", got.ids, got.started.ExpectedCount, want)
	}
	for i, d := range got.events {
		ev, err := envelope.Decode(d.Body)
		if err != nil {
			t.Fatal(err)
		}
		wantVersion := []int64{w1last.Version, w2last.Version, w3last.Version}[i]
		if ev.Version != wantVersion {
			t.Errorf("%s: version %d, want %d", ev.EntityID, ev.Version, wantVersion)
		}
	}
}

// Submit is idempotent by replay_id: the same request, however often and
// however concurrently, runs once; a different request under a used id is
// a conflict; an invalid one is refused and recorded nowhere.
func TestSubmitIsIdempotent(t *testing.T) { onEachBroker(t, testSubmitIsIdempotent) }

func testSubmitIsIdempotent(t *testing.T, e *env) {
	obs := e.observe(t, "#")
	r := e.start(t)
	w := e.newWidget(t)
	e.commit(t, w, 3)

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
	// Again after it ran (upper-case spelling of the same id): still nothing new.
	again := req
	again.ReplayID = strings.ToUpper(id)
	if rec, err := r.Submit(testCtx(t), again); err != nil || rec.ReplayID != id {
		t.Fatalf("Submit of a finished replay = %+v, %v", rec, err)
	}
	never(t, quietWindow, "a duplicate request published again", func() bool {
		return obs.replayOf(t, id).starts != 1 || len(obs.replayOf(t, id).ids) != len(got.ids)
	})
	if rec, _ := r.Get(testCtx(t), id); rec.Attempts != 1 {
		t.Fatalf("the replay ran %d times", rec.Attempts)
	}

	conflict := req
	conflict.Prefix = "other"
	if _, err := r.Submit(testCtx(t), conflict); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("another request under a used replay_id: %v, want a conflict", err)
	}
	bad := replay.Request{ReplayID: uuid.NewString(), Prefix: "widget", EntityType: "widget"}
	_, err := r.Submit(testCtx(t), bad)
	var ae *apperr.Error
	if !errors.As(err, &ae) || ae.Code != apperr.Invalid || ae.Fields["prefix"] == "" {
		t.Fatalf("prefix equal to an entity type: %v, want invalid with a prefix message", err)
	}
	if _, err := r.Get(testCtx(t), bad.ReplayID); apperr.CodeOf(err) != apperr.NotFound {
		t.Fatalf("an invalid request was recorded: %v", err)
	}
	// A cursor of the right shape whose snapshot PostgreSQL refuses (xmin > xmax).
	badCursor := replay.Cursor{Snapshot: "20:10:"}.String()
	_, err = r.Submit(testCtx(t), replay.Request{Prefix: "idem", EntityType: "widget", After: badCursor})
	if !errors.As(err, &ae) || ae.Code != apperr.Invalid || ae.Fields["after"] == "" {
		t.Fatalf("impossible cursor: %v, want invalid with an after message", err)
	}
}

// Several replays run at once, and a long one does not hold up a short one.
func TestSeveralReplaysRunAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const n = 20000
	e.bulk(t, n)
	obs := e.observeWith(t, false, "p1.widget.#", "p2.widget.#", "p3.gadget.#")
	r := e.start(t)

	ids := []string{
		submit(t, r, replay.Request{Prefix: "p1", EntityType: "widget"}),
		submit(t, r, replay.Request{Prefix: "p2", EntityType: "widget"}),
	}
	eventually(t, waitLong, "both long replays running", func() bool {
		for _, id := range ids {
			if rec, _ := r.Get(testCtx(t), id); rec.Status != replay.StatusRunning {
				return false
			}
		}
		return true
	})
	short := submit(t, r, replay.Request{Prefix: "p3", EntityType: "gadget"})
	shortRec := waitStatus(t, r, short, replay.StatusDone)
	var recs []replay.Record
	for _, id := range ids {
		rec := waitStatus(t, r, id, replay.StatusDone)
		if rec.Count != n {
			t.Fatalf("replay %s count %d, want %d", id, rec.Count, n)
		}
		recs = append(recs, rec)
	}
	if !recs[0].StartedAt.Before(*recs[1].FinishedAt) || !recs[1].StartedAt.Before(*recs[0].FinishedAt) {
		t.Fatalf("the two long replays did not overlap: %v–%v and %v–%v",
			recs[0].StartedAt, recs[0].FinishedAt, recs[1].StartedAt, recs[1].FinishedAt)
	}
	for _, rec := range recs {
		if !shortRec.FinishedAt.Before(*rec.FinishedAt) {
			t.Fatalf("the short replay finished at %v, after a long one (%v)", shortRec.FinishedAt, rec.FinishedAt)
		}
	}
	eventually(t, waitLong, "every replayed message", func() bool { return obs.n() == 2*(n+2)+2 })
}
