package projection_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
)

// The embedded mode's path end to end: the worker, the view and the real
// replay responder all dial the in-process broker; only the history and
// the read model are in PostgreSQL.

// startResponder migrates the framework tables (history) into e's database
// and runs a replay.Responder on e's broker until the test ends. It has a
// request queue of its own, so the fake producer of e still sees every
// request too.
func (e *env) startResponder(t *testing.T) (*replay.Responder, *pgstore.Store) {
	t.Helper()
	pool := openPool(t, e.dbURL, 5)
	if err := pgstore.Migrate(testCtx(t), pool, pgstore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	r, err := replay.NewResponder(replay.Config{
		Pool: pool, AMQPURL: e.amqpURL, Dial: e.dial, Topology: e.topo,
		EntityTypes: []string{"widget"}, QueueName: e.ns + ".responder_requests", Workers: 2,
		Logger: testLogger(t),
	})
	if err != nil {
		t.Fatalf("NewResponder: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	t.Cleanup(func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Responder.Run: %v", err)
				}
			case <-time.After(waitFor):
				t.Error("Responder.Run did not return within its stop")
			}
		})
	})
	select {
	case <-r.Ready():
	case err := <-done:
		t.Fatalf("Responder.Run returned at start: %v", err)
	case <-time.After(waitFor):
		t.Fatal("the responder did not start consuming")
	}
	return r, pgstore.New(pool, nil)
}

// record appends evs to the history, as command handlers do.
func record(t *testing.T, s *pgstore.Store, evs []envelope.Event) {
	t.Helper()
	err := s.InTx(testCtx(t), func(ctx context.Context, tx *pgstore.Tx) error {
		for i := range evs {
			if err := tx.Append(ctx, &evs[i]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("append history: %v", err)
	}
}

// uuidHistories returns the histories of n widgets of v versions each
// (history keys entities by UUID).
func uuidHistories(n, v int) []envelope.Event {
	var evs []envelope.Event
	for range n {
		evs = append(evs, widgetHistory(uuid.NewString(), v)...)
	}
	return evs
}

func TestInProcessWorkerRebuildsAndCatchesUpFromTheResponder(t *testing.T) {
	t.Parallel()
	e := newMemEnv(t)
	if e.amqpURL != "" || e.dial == nil {
		t.Fatal("not on the in-process broker")
	}
	resp, store := e.startResponder(t)
	w := e.startWorker(t, "")

	// History holds 12 widgets of 3 versions; the live stream brought only
	// the first two versions of each.
	history := uuidHistories(12, 3)
	record(t, store, history)
	var live []envelope.Event
	for _, ev := range history {
		if ev.Version <= 2 {
			live = append(live, ev)
		}
	}
	e.publishLive(t, live...)
	e.waitModel(t, w, expect(live))

	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if req := e.nextRequest(t); req.ReplayID != id || req.Prefix != w.name || req.Mode != replay.Full {
		t.Fatalf("request %+v, want replay %s under %s", req, id, w.name)
	}
	eventually(t, waitFor, "the rebuild swaps", func() string {
		st := w.status(t)
		if st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 ||
			st.Rebuild.Received != int64(len(history)) || st.Rebuild.Expected != int64(len(history)) {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	if msg := sameModel(e.model(t, w), expect(history)); msg != "" {
		t.Fatalf("after the rebuild: %s", msg)
	}
	st := w.status(t)
	if _, err := replay.ParseCursor(st.Cursor); err != nil || st.Cursors["widget"] != st.Cursor {
		t.Fatalf("cursor %q (%v), cursors %v", st.Cursor, err, st.Cursors)
	}
	eventually(t, waitFor, "the responder records the replay as done", func() string {
		if rec, err := resp.Get(testCtx(t), id); err != nil || rec.Status != replay.StatusDone || rec.Count != int64(len(history)) {
			return fmt.Sprintf("%+v, %v", rec, err)
		}
		return ""
	})

	// Live events after the swap reach the new generation.
	after := widgetHistory(uuid.NewString(), 1)
	e.publishLive(t, after...)
	e.waitModel(t, w, expect(history, after))

	// Events recorded while the live stream missed them: a catch-up
	// replays only what came after the cursor, into the active generation.
	missed := uuidHistories(3, 2)
	record(t, store, missed)
	if _, err := w.CatchUp(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if req := e.nextRequest(t); req.After != st.Cursor {
		t.Fatalf("catch-up request %+v, want after %s", req, st.Cursor)
	}
	e.waitModel(t, w, expect(history, after, missed))
	eventually(t, waitFor, "the catch-up completes", func() string {
		st := w.status(t)
		if st.CatchUp == nil || st.CatchUp.State != projection.RebuildCompleted || st.CatchUp.Received != int64(len(missed)) ||
			st.ActiveGeneration != 2 || st.DeadLettered != 0 {
			return fmt.Sprintf("%+v catch-up %+v", st, st.CatchUp)
		}
		return ""
	})
}

func TestInProcessViewReplaysLatestFromTheResponderThenFollowsLive(t *testing.T) {
	t.Parallel()
	e := newMemEnv(t)
	_, store := e.startResponder(t)
	history := uuidHistories(8, 3)
	record(t, store, history)

	tv, req := e.startView(t)
	checkLatestRequest(t, req, tv.prefix)
	st := tv.waitReady(t)
	tv.waitModel(t, expect(history))
	// A latest replay sends the newest transition of each entity only.
	if st.Received != 8 || st.Expected != 8 || st.Replays != 1 {
		t.Fatalf("after the latest replay: %+v", st)
	}

	live := append(widgetHistory(uuid.NewString(), 2), widgetEvent(history[0].EntityID, 4, false))
	e.publishLive(t, live...)
	tv.waitModel(t, expect(history, live))
	if n := e.queueDepth(t, tv.Queue()); n != 0 {
		t.Fatalf("%d messages left in the view's queue", n)
	}
}
