package projection_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

// reader keeps reading the active model, as the catalog's HTTP readers do,
// and records the smallest model it saw and the generations it read.
type reader struct {
	stop    chan struct{}
	done    chan struct{}
	reads   atomic.Int64
	mu      sync.Mutex
	minRows int
	gens    map[int64]bool
	err     error
}

func (e *env) startReader(t *testing.T, w *testWorker) *reader {
	r := &reader{stop: make(chan struct{}), done: make(chan struct{}), minRows: 1 << 30, gens: map[int64]bool{}}
	sql := `SELECT ` + projection.ActiveGenerationSQL(w.schema, w.name) + `, (SELECT count(*) FROM widgets WHERE generation = ` +
		projection.ActiveGenerationSQL(w.schema, w.name) + `)`
	go func() {
		defer close(r.done)
		for {
			select {
			case <-r.stop:
				return
			default:
			}
			var gen int64
			var n int
			// One statement, one snapshot: the generation and its rows agree.
			if err := e.db.QueryRow(context.Background(), sql).Scan(&gen, &n); err != nil {
				r.mu.Lock()
				r.err = err
				r.mu.Unlock()
				return
			}
			r.mu.Lock()
			r.minRows = min(r.minRows, n)
			r.gens[gen] = true
			r.mu.Unlock()
			r.reads.Add(1)
		}
	}()
	t.Cleanup(r.finish)
	return r
}

func (r *reader) finish() {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	<-r.done
}

func TestRebuildWithoutDowntime(t *testing.T) { onEachBroker(t, testRebuildWithoutDowntime) }

func testRebuildWithoutDowntime(t *testing.T, e *env) {
	w := e.startWorker(t, "")

	// The live model: 20 widgets at version 2.
	var live []envelope.Event
	for i := range 20 {
		live = append(live, widgetHistory(fmt.Sprintf("l%02d", i), 2)...)
	}
	e.publishLive(t, live...)
	e.waitModel(t, w, expect(live))

	// History holds those transitions (same ids) and 5 widgets the live
	// model never saw: 55 events.
	history := append([]envelope.Event(nil), live...)
	for i := range 5 {
		history = append(history, widgetHistory(fmt.Sprintf("h%d", i), 3)...)
	}
	rd := e.startReader(t, w)
	eventually(t, waitFor, "the reader reads", func() string {
		if rd.reads.Load() == 0 {
			return "no read yet"
		}
		return ""
	})

	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t)
	if req.ReplayID != id || req.Prefix != w.name || req.EntityType != "widget" || req.Mode != replay.Full || req.After != "" {
		t.Fatalf("request %+v, want replay %s under prefix %s", req, id, w.name)
	}
	if err := req.Normalize([]string{"widget"}); err != nil {
		t.Fatalf("the producer would refuse the request: %v", err)
	}
	if _, err := w.Rebuild(testCtx(t)); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("a second Rebuild: %v, want Conflict", err)
	}
	if _, err := w.CatchUp(testCtx(t)); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("a CatchUp during a rebuild: %v, want Conflict", err)
	}

	// Stale: another replay's messages under the same prefix, including a
	// completed marker that would end this rebuild at once if it counted.
	stale := uuid.Must(uuid.NewV7()).String()
	staleEvents := []envelope.Event{widgetEvent("s0", 1, false), widgetEvent("l00", 99, false)}
	msgs := []msg{completedMsg(w.name, stale, 0, cursor(1))}
	msgs = append(msgs, replayMsgs(w.name, stale, staleEvents...)...)
	// This replay: started, 50 events, then the completed marker, which
	// overtakes the last 5 events.
	msgs = append(msgs, startedMsg(w.name, id, int64(len(history))))
	msgs = append(msgs, replayMsgs(w.name, id, history[:50]...)...)
	e.publish(t, msgs...)

	eventually(t, waitFor, "50 replayed events in the shadow", func() string {
		st := w.status(t)
		if st.Rebuild.State != projection.RebuildRunning || st.Rebuild.Received != 50 || st.Rebuild.Expected != 55 ||
			st.Rebuild.ShadowGeneration != 2 || st.ActiveGeneration != 1 || st.Rebuild.ReplayID != id {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})

	// Live events during the rebuild reach both generations.
	during := []envelope.Event{widgetEvent("n0", 1, false), widgetEvent("l01", 3, false)}
	e.publishLive(t, during...)
	eventually(t, waitFor, "live events in both generations", func() string {
		if g1, g2 := e.generation(t, 1), e.generation(t, 2); g1["n0"].Version != 1 || g2["n0"].Version != 1 ||
			g1["l01"].Version != 3 || g2["l01"].Version != 3 {
			return fmt.Sprintf("gen1 n0=%v l01=%v, gen2 n0=%v l01=%v", g1["n0"], g1["l01"], g2["n0"], g2["l01"])
		}
		return ""
	})

	// Redelivered replay events and the marker: still 50 distinct, so no swap.
	e.publish(t, append(replayMsgs(w.name, id, history[:10]...), completedMsg(w.name, id, int64(len(history)), cursor(100)))...)
	eventually(t, waitFor, "the repeats are applied to the shadow", func() string {
		if n := w.proj.handed(2, ids(history[:10])); n < 20 {
			return fmt.Sprintf("handed %d times", n)
		}
		return ""
	})
	eventually(t, waitFor, "the completed count is known", func() string {
		if st := w.status(t); st.Rebuild.Expected != 55 || st.Rebuild.Received != 50 || st.Rebuild.State != projection.RebuildRunning ||
			st.ActiveGeneration != 1 {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
	if w.StaleDroppedForTest() != 3 {
		t.Fatalf("stale messages dropped: %d, want 3", w.StaleDroppedForTest())
	}

	// The last 5: the rebuild completes and swaps.
	e.publish(t, replayMsgs(w.name, id, history[50:]...)...)
	eventually(t, waitFor, "the swap", func() string {
		st := w.status(t)
		if st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	want := expect(history, during)
	if msg := sameModel(e.model(t, w), want); msg != "" {
		t.Fatalf("after the swap: %s", msg)
	}
	eventually(t, waitFor, "the old generation is cleared", func() string {
		if n := len(e.generation(t, 1)); n != 0 {
			return fmt.Sprintf("%d rows in generation 1", n)
		}
		return ""
	})
	st := w.status(t)
	if st.Cursor != cursor(100) || st.Cursors["widget"] != cursor(100) || st.Rebuild.Received != 55 || st.Rebuild.Expected != 55 ||
		st.Rebuild.FinishedAt == nil || st.Rebuild.Error != "" || st.Applied < int64(len(history)+len(during)) {
		t.Fatalf("status after the swap: %+v", st)
	}

	eventually(t, waitFor, "the reader reads the new generation", func() string {
		rd.mu.Lock()
		defer rd.mu.Unlock()
		if !rd.gens[2] && rd.err == nil {
			return fmt.Sprintf("generations read: %v", rd.gens)
		}
		return ""
	})
	rd.finish()
	if rd.err != nil {
		t.Fatalf("reader: %v", rd.err)
	}
	if rd.minRows < 20 || !rd.gens[1] || !rd.gens[2] || rd.reads.Load() < 10 {
		t.Fatalf("readers saw at least %d rows (want 20), generations %v, in %d reads", rd.minRows, rd.gens, rd.reads.Load())
	}

	// After the swap, live events go to the new generation only.
	after := widgetEvent("n1", 1, false)
	e.publishLive(t, after)
	want["n1"] = widget{Version: 1, State: "s1"}
	e.waitModel(t, w, want)
	if n := len(e.generation(t, 1)); n != 0 {
		t.Fatalf("%d rows written to the old generation", n)
	}
	if got := w.counter(t, "statemill_projection_replays_total"); got != 1 {
		t.Fatalf("replays_total = %v", got)
	}
}

func TestRebuildTimeoutKeepsTheLiveModel(t *testing.T) {
	onEachBroker(t, testRebuildTimeoutKeepsTheLiveModel)
}

func testRebuildTimeoutKeepsTheLiveModel(t *testing.T, e *env) {
	w := e.startWorker(t, "", withTimeout(1500*time.Millisecond))
	var live []envelope.Event
	for i := range 10 {
		live = append(live, widgetHistory(fmt.Sprintf("l%d", i), 2)...)
	}
	e.publishLive(t, live...)
	e.waitModel(t, w, expect(live))

	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t)
	// The producer starts, sends half, and never completes.
	e.publish(t, append([]msg{startedMsg(w.name, id, 20)}, replayMsgs(w.name, req.ReplayID, live[:10]...)...)...)
	eventually(t, waitFor, "the rebuild fails", func() string {
		st := w.status(t)
		if st.Rebuild.State != projection.RebuildFailed || !strings.Contains(st.Rebuild.Error, "timed out") ||
			st.Rebuild.FinishedAt == nil || st.ActiveGeneration != 1 {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	eventually(t, waitFor, "the shadow is cleared", func() string {
		if n := len(e.generation(t, 2)); n != 0 {
			return fmt.Sprintf("%d rows in the abandoned generation", n)
		}
		return ""
	})
	if msg := sameModel(e.model(t, w), expect(live)); msg != "" {
		t.Fatalf("the live model changed: %s", msg)
	}
	more := widgetEvent("m", 1, false)
	e.publishLive(t, more)
	e.waitModel(t, w, expect(live, []envelope.Event{more}))
	if n := len(e.generation(t, 2)); n != 0 {
		t.Fatalf("a live event went to the abandoned shadow")
	}

	// The lock is free and the leftovers gone: the next rebuild (by the
	// worker restarted with a timeout a loaded machine always meets)
	// completes.
	w.stop()
	w = e.startWorker(t, w.name)
	id2, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatalf("rebuild after a failed one: %v", err)
	}
	req = e.nextRequest(t)
	if req.ReplayID != id2 {
		t.Fatalf("request %+v for replay %s", req, id2)
	}
	// A late message of the abandoned replay is stale now.
	e.publish(t, replayMsgs(w.name, id, widgetEvent("ghost", 1, false))...)
	history := append(append([]envelope.Event(nil), live...), more)
	e.serveReplay(t, req, history, cursor(5))
	eventually(t, waitFor, "the second rebuild swaps", func() string {
		st := w.status(t)
		if st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 || st.Rebuild.ReplayID != id2 {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	if msg := sameModel(e.model(t, w), expect(history)); msg != "" {
		t.Fatal(msg)
	}
}

func TestRebuildIsExclusiveAcrossProcesses(t *testing.T) {
	onEachBroker(t, testRebuildIsExclusiveAcrossProcesses)
}

func testRebuildIsExclusiveAcrossProcesses(t *testing.T, e *env) {
	a := e.startWorker(t, "")
	b := e.startWorker(t, a.name) // a second process of the same projection
	var live []envelope.Event
	for i := range 10 {
		live = append(live, widgetHistory(fmt.Sprintf("l%d", i), 1)...)
	}
	e.publishLive(t, live...)
	e.waitModel(t, a, expect(live)) // a and b share N.live and the read model

	idA, err := a.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	reqA := e.nextRequest(t)
	if _, err := b.Rebuild(testCtx(t)); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("Rebuild in another process during a rebuild: %v, want Conflict", err)
	}
	if st := b.status(t); st.Rebuild.State != projection.RebuildRunning || st.Rebuild.ReplayID != idA {
		t.Fatalf("the other process does not see the running rebuild: %+v", st.Rebuild)
	}
	// Only the process that runs the rebuild consumes N.replay, so b never
	// takes (and drops) a's replay.
	e.serveReplay(t, reqA, live, cursor(1))
	eventually(t, waitFor, "a's rebuild completes", func() string {
		if st := b.status(t); st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
	if b.StaleDroppedForTest() != 0 {
		t.Fatalf("the other process dropped %d replay messages", b.StaleDroppedForTest())
	}

	// Now b may rebuild.
	idB, err := b.Rebuild(testCtx(t))
	if err != nil {
		t.Fatalf("b.Rebuild after a's finished: %v", err)
	}
	reqB := e.nextRequest(t)
	if reqB.ReplayID != idB {
		t.Fatalf("request %+v", reqB)
	}
	e.serveReplay(t, reqB, live, cursor(2))
	eventually(t, waitFor, "b's rebuild completes", func() string {
		if st := a.status(t); st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 3 || st.Cursor != cursor(2) {
			return fmt.Sprintf("active %d %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	if msg := sameModel(e.model(t, a), expect(live)); msg != "" {
		t.Fatal(msg)
	}
}

func TestCatchUpAfterAbsence(t *testing.T) { onEachBroker(t, testCatchUpAfterAbsence) }

func testCatchUpAfterAbsence(t *testing.T, e *env) {
	// A new projection fills itself from history on its first start.
	w1 := e.startWorker(t, "", withRebuildOnFirstStart())
	name := w1.name
	req := e.nextRequest(t)
	if req.Prefix != name || req.After != "" {
		t.Fatalf("first-start request %+v", req)
	}
	var history []envelope.Event
	for i := range 10 {
		history = append(history, widgetHistory(fmt.Sprintf("h%d", i), 2)...)
	}
	e.serveReplay(t, req, history, cursor(10))
	eventually(t, waitFor, "the first rebuild", func() string {
		if st := w1.status(t); st.Rebuild.State != projection.RebuildCompleted || st.Cursor != cursor(10) {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	e.waitModel(t, w1, expect(history))
	if _, err := w1.CatchUp(testCtx(t)); err != nil { // with nothing missed
		t.Fatal(err)
	}
	req = e.nextRequest(t)
	if req.After != cursor(10) || req.Mode != replay.Full {
		t.Fatalf("catch-up request %+v, want after %s", req, cursor(10))
	}
	e.serveReplay(t, req, nil, cursor(11))
	eventually(t, waitFor, "the empty catch-up", func() string {
		st := w1.status(t)
		if st.Cursor != cursor(11) || st.CatchUp == nil || st.CatchUp.State != projection.RebuildCompleted {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	w1.stop()

	// The worker is away and its live queue is gone: what is published
	// meanwhile reaches nobody.
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete(name+".live", false, false, false); err != nil {
		t.Fatal(err)
	}
	_ = ch.Close()
	missed := append(widgetHistory("m0", 2), widgetEvent("h0", 3, false))
	e.publishLive(t, missed...)

	// Back again: it catches up from its cursor, into the active generation.
	w2 := e.startWorker(t, name, withRebuildOnFirstStart())
	req = e.nextRequest(t)
	if req.Prefix != name || req.After != cursor(11) || req.Mode != replay.Full {
		t.Fatalf("automatic catch-up request %+v, want after %s", req, cursor(11))
	}
	// Live traffic after the restart arrives as usual meanwhile.
	fresh := widgetEvent("f0", 1, false)
	e.publishLive(t, fresh)
	e.serveReplay(t, req, missed, cursor(12))
	want := expect(history, missed, []envelope.Event{fresh})
	e.waitModel(t, w2, want)
	eventually(t, waitFor, "the catch-up completes", func() string {
		st := w2.status(t)
		if st.Cursor != cursor(12) || st.CatchUp == nil || st.CatchUp.State != projection.RebuildCompleted ||
			st.CatchUp.Received != int64(len(missed)) || st.ActiveGeneration != 2 || st.Rebuild.State != projection.RebuildCompleted {
			return fmt.Sprintf("%+v catch-up %+v", st, st.CatchUp)
		}
		return ""
	})
}

func TestCatchUpNeedsACursor(t *testing.T) { onEachBroker(t, testCatchUpNeedsACursor) }

func testCatchUpNeedsACursor(t *testing.T, e *env) {
	w := e.startWorker(t, "")
	if _, err := w.CatchUp(testCtx(t)); apperr.CodeOf(err) != apperr.Conflict {
		t.Fatalf("CatchUp without a cursor: %v, want Conflict", err)
	}
	// And the refusal left nothing behind: a rebuild starts.
	if _, err := w.Rebuild(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t)
	e.serveReplay(t, req, nil, cursor(1))
	eventually(t, waitFor, "an empty rebuild completes", func() string {
		if st := w.status(t); st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
}

func TestRebuildWithoutResponderFailsFast(t *testing.T) {
	onEachBroker(t, testRebuildWithoutResponderFailsFast)
}

func testRebuildWithoutResponderFailsFast(t *testing.T, e *env) {
	sandbox.DeleteLater(t, nil, []string{e.ns + ".nobody-listens"})
	w := e.startWorker(t, "", withConfig(func(c *projection.Config) {
		c.Topology.CommandsExchange = e.ns + ".nobody-listens"
	}))
	if _, err := w.Rebuild(testCtx(t)); apperr.CodeOf(err) != apperr.Unavailable || !strings.Contains(err.Error(), "responder") {
		t.Fatalf("Rebuild with no responder: %v, want Unavailable", err)
	}
	st := w.status(t)
	if st.Rebuild.State != projection.RebuildFailed || st.ActiveGeneration != 1 {
		t.Fatalf("%+v", st)
	}
	// The lock was released.
	if _, err := w.Rebuild(testCtx(t)); apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("second Rebuild: %v", err)
	}
}

func TestRebuildOnFirstStartWaitsForAResponder(t *testing.T) {
	onEachBroker(t, testRebuildOnFirstStartWaitsForAResponder)
}

func testRebuildOnFirstStartWaitsForAResponder(t *testing.T, e *env) {
	commands := e.ns + ".late-commands"
	sandbox.DeleteLater(t, nil, []string{commands})
	// Nothing is bound to replay.request on this exchange yet: the
	// catalog started before the producer.
	w := e.startWorker(t, "", withRebuildOnFirstStart(), withConfig(func(c *projection.Config) {
		c.Topology.CommandsExchange = commands
	}))
	eventually(t, waitFor, "a refused first attempt", func() string {
		if st := w.status(t); st.Rebuild.State != projection.RebuildFailed || !strings.Contains(st.Rebuild.Error, "responder") {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.QueueBind(e.ns+".replay_requests", replay.RequestRoutingKey, commands, false, nil); err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t) // the automatic retry reaches the producer now
	history := widgetHistory("h", 2)
	e.serveReplay(t, req, history, cursor(3))
	e.waitModel(t, w, expect(history))
	if st := w.status(t); st.Rebuild.State != projection.RebuildCompleted || st.Cursor != cursor(3) {
		t.Fatalf("%+v", st)
	}
}

func TestStopDuringRebuildKeepsTheLiveModel(t *testing.T) {
	onEachBroker(t, testStopDuringRebuildKeepsTheLiveModel)
}

func testStopDuringRebuildKeepsTheLiveModel(t *testing.T, e *env) {
	w := e.startWorker(t, "")
	live := widgetHistory("l", 2)
	e.publishLive(t, live...)
	e.waitModel(t, w, expect(live))
	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t)
	e.publish(t, append([]msg{startedMsg(w.name, id, 2)}, replayMsgs(w.name, req.ReplayID, live[:1]...)...)...)
	eventually(t, waitFor, "the shadow fills", func() string {
		if n := len(e.generation(t, 2)); n != 1 {
			return fmt.Sprintf("%d rows in the shadow", n)
		}
		return ""
	})
	stopped := time.Now()
	w.stop()
	if d := time.Since(stopped); d > 10*time.Second {
		t.Fatalf("Run took %s to stop", d)
	}
	st, err := w.Status(testCtx(t)) // answers from the database without Run
	if err != nil {
		t.Fatal(err)
	}
	if st.Rebuild.State != projection.RebuildFailed || !strings.Contains(st.Rebuild.Error, "stopped") || st.ActiveGeneration != 1 ||
		st.Connected || st.LagMessages != -1 {
		t.Fatalf("after a stop: %+v", st)
	}
	if n := len(e.generation(t, 2)); n != 0 {
		t.Fatalf("%d rows left in the shadow", n)
	}
	if _, err := w.Rebuild(testCtx(t)); apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("Rebuild of a stopped worker: %v, want Unavailable", err)
	}
	if msg := sameModel(e.model(t, w), expect(live)); msg != "" {
		t.Fatal(msg)
	}
}

func TestInterruptedRebuildIsCleanedUpAtStart(t *testing.T) {
	onEachBroker(t, testInterruptedRebuildIsCleanedUpAtStart)
}

func testInterruptedRebuildIsCleanedUpAtStart(t *testing.T, e *env) {
	w := e.startWorker(t, "")
	live := widgetHistory("l", 1)
	e.publishLive(t, live...)
	e.waitModel(t, w, expect(live))
	w.stop()
	// As a process that died in the middle of a rebuild leaves it.
	ctx := testCtx(t)
	if _, err := e.db.Exec(ctx, `UPDATE `+w.schema+`.projection_state SET shadow_generation = 2, rebuild_state = 'running',
		rebuild_replay_ids = '{x}', rebuild_generation = 2 WHERE name = $1`, w.name); err != nil {
		t.Fatal(err)
	}
	if _, err := e.db.Exec(ctx, `INSERT INTO widgets VALUES (2, 'half', 1, 's1')`); err != nil {
		t.Fatal(err)
	}
	w2 := e.startWorker(t, w.name)
	st := w2.status(t)
	if st.Rebuild.State != projection.RebuildFailed || !strings.Contains(st.Rebuild.Error, "interrupted") || st.ActiveGeneration != 1 {
		t.Fatalf("%+v", st.Rebuild)
	}
	if n := len(e.generation(t, 2)); n != 0 {
		t.Fatalf("%d rows left in the interrupted shadow", n)
	}
	more := widgetEvent("m", 1, false)
	e.publishLive(t, more)
	e.waitModel(t, w2, expect(live, []envelope.Event{more}))
	if n := len(e.generation(t, 2)); n != 0 {
		t.Fatal("live events still go to the interrupted shadow")
	}
}
