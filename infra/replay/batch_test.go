package replay_test

import (
	"encoding/json"
	"reflect"
	"slices"
	"testing"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// A batched replay sends the same events as a plain one, in the same order,
// in messages of up to Batch events under replay_batch, with the same
// markers and counts (events, not messages); the request records its batch.
func TestBatchedReplay(t *testing.T) { onEachBroker(t, testBatchedReplay) }

func testBatchedReplay(t *testing.T, e *env) {
	mine := e.observe(t, envelope.ReplayBinding("cat", "widget"))
	r := e.start(t)
	var want []string
	for range 3 {
		id := e.newWidget(t)
		want = append(want, ids(e.commit(t, id, 1))...)
		want = append(want, ids(e.commit(t, id, 2))...)
	}
	plain := mine.collect(t, submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget"}))
	id := submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget", Batch: 4})
	batched := mine.collect(t, id)
	checkBatched(t, plain, batched, want, 4, "cat.widget")
	if rec := waitStatus(t, r, id, replay.StatusDone); rec.Batch != 4 || rec.Count != int64(len(want)) {
		t.Fatalf("record batch %d, count %d; want 4 and %d", rec.Batch, rec.Count, len(want))
	}
}

// The same from the embedded store.
func TestSQLiteBatchedReplay(t *testing.T) { onEachSQLite(t, testSQLiteBatchedReplay) }

func testSQLiteBatchedReplay(t *testing.T, s *sqliteEnv) {
	mine := s.observe(t, envelope.ReplayBinding("cat", "widget"))
	r := s.start(t)
	var want []string
	for range 3 {
		w := uuid.NewString()
		want = append(want, ids(s.commit(t, w, 1))...)
		want = append(want, ids(s.commit(t, w, 2))...)
	}
	plain := mine.collect(t, submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget"}))
	id := submit(t, r, replay.Request{Prefix: "cat", EntityType: "widget", Batch: 4})
	checkBatched(t, plain, mine.collect(t, id), want, 4, "cat.widget")
	if rec := waitStatus(t, r, id, replay.StatusDone); rec.Batch != 4 {
		t.Fatalf("record batch %d, want 4", rec.Batch)
	}
}

func checkBatched(t *testing.T, plain, batched run, want []string, batch int, keyPrefix string) {
	t.Helper()
	if len(plain.batches) != 0 || len(plain.events) != len(want) {
		t.Fatalf("the plain replay sent %d batches and %d events, want 0 and %d", len(plain.batches), len(plain.events), len(want))
	}
	if !slices.Equal(batched.ids, want) || !slices.Equal(plain.ids, want) {
		t.Fatalf("batched %v, plain %v; want %v (sequence order)", batched.ids, plain.ids, want)
	}
	if n := (len(want) + batch - 1) / batch; len(batched.batches) != n || len(batched.events) != 0 {
		t.Fatalf("%d batch messages and %d single ones; want %d and 0", len(batched.batches), len(batched.events), n)
	}
	if batched.started.ExpectedCount != int64(len(want)) || batched.completed.Count != int64(len(want)) {
		t.Fatalf("markers %+v %+v, want %d events", batched.started, batched.completed, len(want))
	}
	for i, d := range batched.batches {
		if d.RoutingKey != keyPrefix+"."+replay.BatchEvent || d.Type != replay.BatchEvent ||
			d.Headers[envelope.HeaderReplayID] != batched.completed.ReplayID ||
			d.DeliveryMode != amqp091.Persistent || d.ContentType != "application/json" || uuid.Validate(d.MessageId) != nil {
			t.Errorf("batch message %d: key %q, type %q, headers %v, mode %d, content type %q, id %q",
				i, d.RoutingKey, d.Type, d.Headers, d.DeliveryMode, d.ContentType, d.MessageId)
		}
	}
	for i, d := range plain.events {
		var single, inBatch any
		mustUnmarshal(t, d.Body, &single)
		b, err := json.Marshal(batched.batched[i])
		if err != nil {
			t.Fatal(err)
		}
		mustUnmarshal(t, b, &inBatch)
		if !reflect.DeepEqual(single, inBatch) {
			t.Errorf("event %s differs between the replays:\nplain   %s\nbatched %s", d.MessageId, d.Body, b)
		}
	}
}

func mustUnmarshal(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
}

// Batch is refused outside 0..MaxBatch; 0 means 1.
func TestRequestBatchBounds(t *testing.T) {
	for _, b := range []int{-1, replay.MaxBatch + 1} {
		req := replay.Request{Prefix: "cat", EntityType: "widget", Batch: b}
		if err := req.Normalize([]string{"widget"}); apperr.CodeOf(err) != apperr.Invalid {
			t.Errorf("batch %d: %v, want invalid", b, err)
		}
	}
	for b, want := range map[int]int{0: 1, 1: 1, replay.MaxBatch: replay.MaxBatch} {
		req := replay.Request{Prefix: "cat", EntityType: "widget", Batch: b}
		if err := req.Normalize([]string{"widget"}); err != nil || req.Batch != want {
			t.Errorf("batch %d: %v, normalized to %d; want %d", b, err, req.Batch, want)
		}
	}
}
