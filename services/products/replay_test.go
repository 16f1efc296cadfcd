package main

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/services/products/service"
)

// holdsFor fails t if cond stops holding at any time within window.
func holdsFor(t *testing.T, window time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(window)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if !cond() {
			t.Fatalf("%s", what)
		}
		select {
		case <-deadline:
			return
		case <-tick.C:
		}
	}
}

// replayQueues deletes the service's namespaced request queues when t
// ends, after the service has stopped (else it would declare them again).
func (s *system) replayQueues(t *testing.T) {
	q := service.ReplayQueue(s.topology)
	sandbox.DeleteLater(t, []string{q, q + ".dead"}, nil)
	t.Cleanup(func() { _ = s.shutdown() }) // cleanups run last-in first-out
}

func (s *system) replayRecord(t *testing.T, id string) replay.Record {
	t.Helper()
	r := s.do("GET", "/api/replays/"+id, "")
	if r.status != http.StatusOK {
		t.Fatalf("GET replay %s: %d %s", id, r.status, r.body)
	}
	var rec replay.Record
	r.json(t, &rec)
	return rec
}

// replayed splits what an observer got for replay id into events and markers.
func replayed(t *testing.T, ds []amqp091.Delivery, id string) (events []envelope.Event, completed *replay.Completed) {
	t.Helper()
	for _, d := range ds {
		if d.Headers[envelope.HeaderReplayID] != id {
			continue
		}
		switch {
		case strings.HasSuffix(d.RoutingKey, "."+replay.CompletedEvent):
			completed = new(replay.Completed)
			if err := json.Unmarshal(d.Body, completed); err != nil {
				t.Fatal(err)
			}
		case strings.HasSuffix(d.RoutingKey, "."+replay.StartedEvent):
		default:
			events = append(events, decodeEvent(t, d))
		}
	}
	return events, completed
}

func TestReplayOverHTTP(t *testing.T) {
	t.Parallel()
	s := start(t)
	s.replayQueues(t)
	live := s.observe("product.#")
	mine := s.observe("catalog.product.#")
	a := s.create("tea", 300, 2) // two transitions
	b := s.create("jam", 450, 0)
	live.wait(t, 3)

	r := s.do("POST", "/api/replays", `{"prefix":"catalog","entity_type":"product"}`)
	if r.status != http.StatusAccepted {
		t.Fatalf("POST /api/replays: %d %s", r.status, r.body)
	}
	var accepted struct {
		ReplayID string `json:"replay_id"`
	}
	r.json(t, &accepted)
	if accepted.ReplayID == "" || r.header.Get("Location") != "/api/replays/"+accepted.ReplayID {
		t.Fatalf("202 body %s, Location %q", r.body, r.header.Get("Location"))
	}
	ds := mine.wait(t, 5)
	events, completed := replayed(t, ds, accepted.ReplayID)
	if completed == nil || completed.Count != 3 || len(events) != 3 {
		t.Fatalf("replay delivered %d events, completed %+v; want 3", len(events), completed)
	}
	var want []string
	for _, id := range []string{a.ID, b.ID} {
		var h []envelope.Event
		s.do("GET", "/api/products/"+id+"/history", "").json(t, &h)
		for _, e := range h {
			want = append(want, e.ID)
		}
	}
	var got []string
	for _, e := range events {
		got = append(got, e.ID)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("replayed %v, history %v", got, want)
	}
	for _, d := range ds {
		if !strings.HasPrefix(d.RoutingKey, "catalog.product.") {
			t.Fatalf("routing key %q outside the prefix", d.RoutingKey)
		}
	}
	eventually(t, 20*time.Second, "the replay recorded as done", func() bool {
		rec := s.replayRecord(t, accepted.ReplayID)
		return rec.Status == replay.StatusDone && rec.Count == 3 && rec.Cursor == completed.Cursor
	})
	// The live consumer got nothing of the replay.
	if n := len(live.snapshot()); n != 3 {
		t.Fatalf("the live consumer received %d messages; want the 3 live events only", n)
	}
	metrics := string(s.do("GET", "/metrics", "").body)
	for _, want := range []string{`statemill_replay_events_published_total{entity_type="product"} 3`, `statemill_replays_total{status="done"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if r := s.do("GET", "/api/replays/0198f0c2-7d1e-7000-8000-000000000001", ""); r.status != http.StatusNotFound {
		t.Fatalf("unknown replay: %d", r.status)
	}
}

// RequestReplay over the commands exchange reaches the service's queue and runs.
func TestReplayOverAMQP(t *testing.T) {
	t.Parallel()
	s := start(t)
	s.replayQueues(t)
	s.create("salt", 80, 1)
	mine := s.observe("ui-7f3a.product.#")

	conn, err := amqp091.Dial(s.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	// The service consumes its queue once healthy; wait until the queue has
	// its consumer, or the request would go unrouted before the bind.
	eventually(t, 20*time.Second, "the request queue consumed", func() bool {
		c, err := conn.Channel()
		if err != nil {
			return false
		}
		defer c.Close()
		q, err := c.QueueDeclarePassive(service.ReplayQueue(s.topology), true, false, false, false, nil)
		return err == nil && q.Consumers > 0
	})
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	id := "0198f0c2-7d1e-7000-8000-0000000000aa"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, s.topology.CommandsExchange, replay.RequestRoutingKey, false, false,
		amqp091.Publishing{ContentType: "application/json", Body: []byte(`{"replay_id":"` + id + `","prefix":"ui-7f3a","entity_type":"product","mode":"latest"}`)})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := dc.WaitContext(ctx); !ok || err != nil {
		t.Fatalf("request not confirmed: %v", err)
	}
	events, completed := replayed(t, mine.wait(t, 3), id)
	if completed == nil || completed.Count != 1 || len(events) != 1 || events[0].Version != 2 {
		t.Fatalf("latest replay over AMQP: %+v, completed %+v; want the product's version 2 only", events, completed)
	}
}

// Bad prefixes, entity types, cursors, modes and batches are refused with 422 and
// field errors, and nothing is published or recorded.
func TestReplayRefusesBadRequests(t *testing.T) {
	t.Parallel()
	s := start(t)
	s.replayQueues(t)
	all := s.observe("#")
	// Positive control: the observer sees what is published.
	s.create("control", 1, 0)
	all.wait(t, 1)

	field := func(name string, body map[string]any) {
		t.Helper()
		r := s.do("POST", "/api/replays", mustJSON(body))
		if r.status != http.StatusUnprocessableEntity {
			t.Fatalf("%v: %d %s, want 422", body, r.status, r.body)
		}
		if p := r.problem(t); p.Errors[name] == "" {
			t.Fatalf("%v: problem %+v has no errors.%s", body, p, name)
		}
	}
	for _, prefix := range []string{"", "product", "PRODUCT", "a.b", "#", "*", strings.Repeat("a", 80), "replay", "9lives", "a b"} {
		field("prefix", map[string]any{"prefix": prefix, "entity_type": "product"})
	}
	for _, et := range []string{"", "widget", "Product", "product.#"} {
		field("entity_type", map[string]any{"prefix": "catalog", "entity_type": et})
	}
	for _, after := range []string{"nope", replay.Cursor{Snapshot: "20:10:"}.String(), "cGcxOjE6Mjo="} {
		field("after", map[string]any{"prefix": "catalog", "entity_type": "product", "after": after})
	}
	field("mode", map[string]any{"prefix": "catalog", "entity_type": "product", "mode": "sideways"})
	for _, batch := range []any{-1, 1001, "100", 1.5} {
		field("batch", map[string]any{"prefix": "catalog", "entity_type": "product", "batch": batch})
	}
	field("replay_id", map[string]any{"replay_id": "x", "prefix": "catalog", "entity_type": "product"})
	field("extra", map[string]any{"prefix": "catalog", "entity_type": "product", "extra": 1})
	field("prefix", map[string]any{"prefix": 7, "entity_type": "product"})

	holdsFor(t, time.Second, "a refused request published something", func() bool { return len(all.snapshot()) == 1 })
	conn, err := pgx.Connect(context.Background(), s.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM replay_requests`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d refused requests were recorded", n)
	}
}
