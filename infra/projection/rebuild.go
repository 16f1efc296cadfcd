package projection

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/replay"
)

// runKind is what a run does with its replay.
type runKind string

const (
	kindRebuild runKind = "rebuild"  // fill a shadow generation, then swap
	kindCatchUp runKind = "catch_up" // apply what the cursor's snapshot did not see to the active generation
)

// run is a rebuild or catch-up of this process: one replay per entity type.
type run struct {
	kind     runKind
	gen      int64    // rebuild: the shadow generation
	ids      []string // replay ids, in Config.EntityTypes order
	started  time.Time
	deadline time.Time
	lock     *rebuildLock
	complete chan struct{} // closed when every replay delivered its count
	ended    chan struct{} // closed when the run is over
	aborted  chan struct{} // closed by abort: the run cannot complete
	abortErr error         // why, set before aborted is closed

	// finishing is set once the run's outcome is stored: a Rebuild or
	// CatchUp call waits for ended then, instead of answering Conflict.
	finishing atomic.Bool

	mu       sync.Mutex
	tracks   map[string]*track // by replay id
	finished bool              // complete is closed
}

// track follows one replay: the distinct event ids received (16 bytes each,
// so a million events cost some tens of MB) and its markers.
type track struct {
	entityType string
	seen       map[[16]byte]struct{}
	expected   int64 // replay_started's expected_count
	count      int64 // replay_completed's count
	completed  bool
	cursor     string
}

func newRun(kind runKind, entityTypes []string, timeout time.Duration) *run {
	now := time.Now()
	r := &run{
		kind: kind, started: now, deadline: now.Add(timeout),
		complete: make(chan struct{}), ended: make(chan struct{}), aborted: make(chan struct{}),
		tracks: make(map[string]*track, len(entityTypes)),
	}
	for _, et := range entityTypes {
		id := uuid.Must(uuid.NewV7()).String()
		r.ids = append(r.ids, id)
		r.tracks[id] = &track{entityType: et, seen: map[[16]byte]struct{}{}}
	}
	return r
}

// track returns the track of replay id, or nil for another replay.
func (r *run) track(id string) *track {
	if id == "" {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tracks[id]
}

func (r *run) see(t *track, id string) {
	if t == nil || id == "" {
		return
	}
	k := eventKey(id)
	r.mu.Lock()
	t.seen[k] = struct{}{}
	r.mu.Unlock()
}

// abort fails the run at once (the first cause wins), for a delivery that
// makes completing impossible.
func (r *run) abort(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.abortErr == nil {
		r.abortErr = err
		close(r.aborted)
	}
}

func (r *run) markStarted(t *track, expected int64) {
	r.mu.Lock()
	t.expected = expected
	r.mu.Unlock()
}

func (r *run) markCompleted(t *track, count int64, cursor string) {
	r.mu.Lock()
	t.count, t.cursor, t.completed = count, cursor, true
	r.mu.Unlock()
	r.checkComplete()
}

// checkComplete closes complete once every replay's completed marker came
// and it has received that many distinct events (the marker may overtake
// the last events).
func (r *run) checkComplete() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished {
		return
	}
	for _, t := range r.tracks {
		if !t.completed || int64(len(t.seen)) < t.count {
			return
		}
	}
	r.finished = true
	close(r.complete)
}

// progress sums the expected (the completed count once known) and received
// counts over the replays.
func (r *run) progress() (expected, received int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range r.tracks {
		if t.completed {
			expected += t.count
		} else {
			expected += t.expected
		}
		received += int64(len(t.seen))
	}
	return expected, received
}

// cursors are the completed replays' cursors by entity type.
func (r *run) cursors() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := make(map[string]string, len(r.tracks))
	for _, t := range r.tracks {
		if t.cursor != "" {
			c[t.entityType] = t.cursor
		}
	}
	return c
}

// Rebuild rebuilds the read model without downtime and returns the replay
// id (of the first entity type) as soon as the replay is requested; the rest
// runs in the background, its progress visible in Status. In the order of
// DESIGN §7: N.live is bound (the worker consumes it), a shadow generation
// is created and live events go to both generations from the next batch
// on, N.replay is bound and purged, then a replay under the prefix N is
// requested for each entity type. The replayed events fill the shadow; when
// each replay has delivered its count of distinct events, one transaction
// makes the shadow active (readers switch at once) and stores the replay
// cursors, and the old generation is cleared. When the replays do not
// complete within RebuildTimeout, or anything fails, the shadow is dropped
// and the live model kept; Status reports the failure.
//
// Errors: apperr.Conflict when a rebuild or catch-up of this projection runs
// (in this process or another), apperr.Unavailable when the worker is not
// running or the broker or database cannot be reached, or no replay
// responder is bound to the request's routing key.
func (w *Worker) Rebuild(ctx context.Context) (replayID string, err error) {
	return w.start(ctx, kindRebuild)
}

// CatchUp requests, for each entity type, a replay of what the snapshot of
// the stored cursor did not see, and applies it directly to the active
// generation: the incremental catch-up of a worker that was away (Run starts
// one itself when N.live did not exist before it started). It needs a
// cursor, which a completed rebuild stores (apperr.Conflict without one);
// otherwise it behaves like Rebuild.
func (w *Worker) CatchUp(ctx context.Context) (replayID string, err error) {
	return w.start(ctx, kindCatchUp)
}

func (w *Worker) start(ctx context.Context, kind runKind) (string, error) {
	w.mu.Lock()
	for w.cur != nil && w.cur.finishing.Load() {
		ended := w.cur.ended
		w.mu.Unlock()
		select {
		case <-ended:
		case <-ctx.Done():
			return "", apperr.Wrap(apperr.Unavailable, ctx.Err(), "the previous run is still finishing")
		}
		w.mu.Lock()
	}
	switch {
	case !w.running:
		w.mu.Unlock()
		return "", apperr.Errorf(apperr.Unavailable, "the projection worker %q is not running", w.cfg.Name)
	case w.cur != nil || w.starting:
		w.mu.Unlock()
		return "", apperr.Errorf(apperr.Conflict, "a rebuild or catch-up of %q is already running", w.cfg.Name)
	}
	w.starting = true
	runCtx := w.runCtx
	w.supervisors.Add(1)
	w.mu.Unlock()
	supervised := false
	defer func() {
		w.mu.Lock()
		w.starting = false
		w.mu.Unlock()
		if !supervised {
			w.supervisors.Done()
		}
	}()

	lock, ok, err := w.store.tryLock(ctx)
	if err != nil {
		return "", pgstore.Classify(err)
	}
	if !ok {
		return "", apperr.Errorf(apperr.Conflict, "a rebuild or catch-up of %q is running in another process", w.cfg.Name)
	}
	r := newRun(kind, w.cfg.EntityTypes, w.cfg.RebuildTimeout)
	r.lock = lock
	if err := w.begin(ctx, r); err != nil {
		lock.release()
		return "", err
	}
	supervised = true
	go w.supervise(runCtx, r)
	w.log.Info(string(kind)+" started", "replay_ids", r.ids, "shadow_generation", r.gen)
	return r.ids[0], nil
}

// begin does the synchronous part of a run: the switch (rebuild), the purge
// of N.replay, and the requests. On failure it undoes the switch.
func (w *Worker) begin(ctx context.Context, r *run) (err error) {
	if w.currentConn() == nil {
		return apperr.Errorf(apperr.Unavailable, "the projection worker %q is not connected to the broker", w.cfg.Name)
	}
	after := map[string]string{}
	if r.kind == kindCatchUp {
		var state row
		if state, err = w.store.read(ctx); err != nil {
			return pgstore.Classify(err)
		}
		for _, et := range w.cfg.EntityTypes {
			if state.cursors[et] == "" {
				return apperr.Errorf(apperr.Conflict, "no replay cursor for %s yet: rebuild %q first", et, w.cfg.Name)
			}
			after[et] = state.cursors[et]
		}
	} else {
		var active int64
		if active, err = w.store.prepareRebuild(ctx); err != nil {
			return pgstore.Classify(err)
		}
		if r.gen, err = w.store.switchToShadow(ctx, active, r.ids); err != nil {
			return pgstore.Classify(err)
		}
		defer func() {
			if err != nil {
				w.giveUp(r, fmt.Errorf("could not request the replay: %w", err), time.Minute)
			}
		}()
	}

	conn := w.currentConn()
	if conn == nil {
		return apperr.Errorf(apperr.Unavailable, "the projection worker %q is not connected to the broker", w.cfg.Name)
	}
	if err := w.purgeReplay(conn); err != nil {
		return apperr.Wrap(apperr.Unavailable, err, "cannot purge the replay queue")
	}
	w.mu.Lock()
	w.cur = r
	w.mu.Unlock()
	w.notifyRunChanged()
	if err := w.request(ctx, conn, r, after); err != nil {
		w.endRun(r)
		return err
	}
	return nil
}

// purgeReplay binds N.replay (again: it must be bound before the request)
// and empties it of earlier replays' leftovers. With Topology.Passive the
// definitions file holds the queue and its bindings: it only checks that
// the queue exists and purges it (the purge needs read permission only).
func (w *Worker) purgeReplay(conn broker.Conn) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	q := w.replayQueue()
	if w.cfg.Topology.Passive {
		if _, err := broker.CheckQueue(ch, q); err != nil {
			return err
		}
	} else if err := w.declareReplay(conn); err != nil {
		return err
	}
	n, err := ch.QueuePurge(q, false)
	if n > 0 {
		w.log.Info("purged leftovers of earlier replays", "queue", q, "messages", n)
	}
	return err
}

// request publishes one replay.Request per entity type to the commands
// exchange, with publisher confirms, as mandatory messages: a request no
// queue is bound for comes back, and the run fails at once instead of
// waiting for its timeout.
func (w *Worker) request(ctx context.Context, conn broker.Conn, r *run, after map[string]string) error {
	ch, err := conn.Channel()
	if err != nil {
		return apperr.Wrap(apperr.Unavailable, err, "cannot open a broker channel")
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return apperr.Wrap(apperr.Unavailable, err, "cannot enable publisher confirms")
	}
	returns := ch.NotifyReturn(make(chan amqp091.Return, len(r.ids)))
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var confirms []broker.Confirmation
	for i, et := range w.cfg.EntityTypes {
		req := replay.Request{ReplayID: r.ids[i], Prefix: w.cfg.Name, EntityType: et, After: after[et], Mode: replay.Full,
			Batch: w.cfg.ReplayEventsPerMessage}
		if err := req.Normalize(w.cfg.EntityTypes); err != nil {
			return err
		}
		body, err := json.Marshal(req)
		if err != nil {
			return err
		}
		dc, err := ch.Publish(ctx, w.cfg.Topology.CommandsExchange, replay.RequestRoutingKey, true,
			amqp091.Publishing{
				ContentType:  "application/json",
				DeliveryMode: amqp091.Persistent,
				MessageId:    req.ReplayID,
				Timestamp:    time.Now(),
				Headers:      amqp091.Table{envelope.HeaderCorrelationID: req.ReplayID},
				Body:         body,
			})
		if err != nil {
			return apperr.Wrap(apperr.Unavailable, err, "cannot publish the replay request")
		}
		confirms = append(confirms, dc)
	}
	for _, dc := range confirms {
		ok, err := waitConfirm(ctx, dc)
		if err != nil {
			return apperr.Wrap(apperr.Unavailable, err, "the broker did not confirm the replay request")
		}
		if !ok {
			return apperr.Errorf(apperr.Unavailable, "the broker refused the replay request")
		}
	}
	// A basic.return precedes the confirm of its message.
	select {
	case ret := <-returns:
		return apperr.Errorf(apperr.Unavailable, "no replay responder is bound to %q on %s (%s)",
			ret.RoutingKey, ret.Exchange, ret.ReplyText)
	default:
	}
	return nil
}

// waitConfirm waits for the broker's answer to one publish: ok is false
// when it nacked the message or the channel closed first; err is ctx's.
func waitConfirm(ctx context.Context, c broker.Confirmation) (ok bool, err error) {
	select {
	case <-c.Done():
		return c.Acked(), nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// supervise waits for r to complete, time out or be stopped, then swaps
// (rebuild), stores the cursors (catch-up) or gives up.
func (w *Worker) supervise(runCtx context.Context, r *run) {
	defer w.supervisors.Done()
	timeout := time.NewTimer(time.Until(r.deadline))
	defer timeout.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var err error
	var old int64 // the generation a swap replaced
wait:
	for {
		select {
		case <-r.complete:
			old, err = w.finish(runCtx, r)
			break wait
		case <-r.aborted:
			r.mu.Lock()
			err = r.abortErr
			r.mu.Unlock()
			break wait
		case <-timeout.C:
			exp, got := r.progress()
			err = fmt.Errorf("timed out after %s: %d of %d events received", w.cfg.RebuildTimeout, got, exp)
			break wait
		case <-runCtx.Done():
			err = errors.New("the worker stopped")
			break wait
		case <-tick.C:
			if r.kind == kindRebuild {
				exp, got := r.progress()
				ctx, cancel := context.WithTimeout(runCtx, 2*time.Second)
				if err := w.store.recordProgress(ctx, r, exp, got); err != nil && runCtx.Err() == nil {
					w.log.Debug("cannot record the rebuild progress", "err", err)
				}
				cancel()
			}
		}
	}
	outcome := "completed"
	if err != nil {
		outcome = "failed"
		// On a stop, do not hold the stop up for long: the next start
		// cleans up what is left (recoverInterrupted).
		timeout := time.Minute
		if runCtx.Err() != nil {
			timeout = 5 * time.Second
		}
		w.giveUp(r, err, timeout)
	}
	w.m.replayFinished(r.kind, outcome)
	if r.kind == kindCatchUp {
		w.recordCatchUp(r, err)
	}
	r.lock.release()
	w.endRun(r)
	if old != 0 {
		// After the lock: a rebuild that starts meanwhile clears the same
		// generation (it is neither active nor its shadow), harmlessly.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(runCtx), time.Minute)
		defer cancel()
		err := retry(ctx, w, "clear the old generation", nil, func(ctx context.Context) error { return w.store.clear(ctx, old) })
		if err != nil {
			w.log.Warn("the old generation was not cleared; the next rebuild clears it", "generation", old, "err", err)
		}
	}
}

// finish makes a completed run take effect. After a swap it returns the
// generation that was active before.
func (w *Worker) finish(runCtx context.Context, r *run) (old int64, err error) {
	ctx, cancel := context.WithDeadline(runCtx, r.deadline.Add(time.Minute))
	defer cancel()
	cursors := r.cursors()
	exp, got := r.progress()
	if r.kind == kindCatchUp {
		err := retry(ctx, w, "store the catch-up cursors", nil, func(ctx context.Context) error {
			return w.store.mergeCursors(ctx, cursors)
		})
		if err != nil {
			return 0, fmt.Errorf("store the cursors: %w", err)
		}
		r.finishing.Store(true)
		w.log.Info("catch-up completed", "replay_ids", r.ids, "events", got)
		return 0, nil
	}
	if !r.lock.alive(ctx) {
		// The lock's session died (a database outage): another process may
		// have started a rebuild since. The swap checks the state row
		// under FOR UPDATE anyway; this only makes the log clearer.
		w.log.Warn("the rebuild lock's connection was lost; swapping only if the state row still names this rebuild")
	}
	err = retry(ctx, w, "swap in the rebuilt generation", nil, func(ctx context.Context) error {
		var err error
		old, err = w.store.swap(ctx, r, cursors, exp, got)
		return err
	})
	if errors.Is(err, errRunGone) {
		return 0, errors.New("the state row no longer names this rebuild (taken over)")
	}
	if err != nil {
		return 0, fmt.Errorf("swap: %w", err)
	}
	r.finishing.Store(true)
	w.log.Info("rebuild completed: the new generation is active", "generation", r.gen, "old_generation", old,
		"events", got, "took", time.Since(r.started).Round(time.Millisecond))
	return old, nil
}

// giveUp abandons r: for a rebuild the shadow is dropped and cleared and the
// state becomes failed; the live model is untouched.
func (w *Worker) giveUp(r *run, cause error, timeout time.Duration) {
	w.log.Error(string(r.kind)+" failed; the live model is kept", "replay_ids", r.ids, "err", cause)
	if r.kind != kindRebuild {
		return
	}
	exp, got := r.progress()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := retry(ctx, w, "give the rebuild up", nil, func(ctx context.Context) error {
		return w.store.abandon(ctx, r, cause.Error(), exp, got)
	})
	if errors.Is(err, errRunGone) {
		return // another process's rebuild replaced it; nothing of ours to clear
	}
	if err != nil {
		w.log.Error("cannot record the failed rebuild; the next start or rebuild cleans it up", "err", err)
		return
	}
	r.finishing.Store(true)
	// Under the lock still: the next rebuild uses the same generation number.
	err = retry(ctx, w, "clear the abandoned shadow", nil, func(ctx context.Context) error { return w.store.clear(ctx, r.gen) })
	if err != nil {
		w.log.Error("the abandoned shadow was not cleared; the next rebuild clears it", "generation", r.gen, "err", err)
	}
}

// endRun stops the replay consumer of r.
func (w *Worker) endRun(r *run) {
	w.mu.Lock()
	if w.cur == r {
		w.cur = nil
	}
	w.mu.Unlock()
	select {
	case <-r.ended:
	default:
		close(r.ended)
	}
	w.notifyRunChanged()
}

func (w *Worker) recordCatchUp(r *run, err error) {
	st := r.status(RebuildCompleted)
	if err != nil {
		st.State, st.Error = RebuildFailed, err.Error()
	}
	now := time.Now()
	st.FinishedAt = &now
	w.mu.Lock()
	w.lastCatchUp = &st
	w.mu.Unlock()
}

// status describes r as a Rebuild.
func (r *run) status(state RebuildState) Rebuild {
	exp, got := r.progress()
	started := r.started
	st := Rebuild{State: state, ReplayIDs: r.ids, Expected: exp, Received: got, StartedAt: &started}
	if len(r.ids) > 0 {
		st.ReplayID = r.ids[0]
	}
	if r.kind == kindRebuild {
		st.ShadowGeneration = r.gen
	}
	return st
}

// Status reports the worker's progress, lag and rebuild state. The
// generations, counts and cursors come from the database (so any process
// of the projection can answer); the broker lag, connection and
// dead-letter count are this process's. When the database cannot be read,
// it returns what it knows with an apperr.Unavailable error.
func (w *Worker) Status(ctx context.Context) (Status, error) {
	st := Status{
		Name:         w.cfg.Name,
		DeadLettered: w.deadLettered.Load(),
		LagSeconds:   w.lagSeconds(),
		LagMessages:  -1,
	}
	if conn := w.currentConn(); conn != nil {
		st.Connected = true
		if n, err := w.readyMessages(ctx, conn); err == nil {
			st.LagMessages = n
		}
	}
	w.mu.Lock()
	cur, last := w.cur, w.lastCatchUp
	w.mu.Unlock()
	if cur != nil && cur.kind == kindCatchUp {
		c := cur.status(RebuildRunning)
		st.CatchUp = &c
	} else if last != nil {
		c := *last
		st.CatchUp = &c
	}

	row, err := w.store.read(ctx)
	if err != nil {
		return st, pgstore.Classify(err)
	}
	st.ActiveGeneration = row.active
	st.Applied = row.applied
	if row.lastEventAt != nil {
		st.LastEventAt = row.lastEventAt.UTC()
	}
	if len(row.cursors) > 0 {
		st.Cursors = row.cursors
		if len(w.cfg.EntityTypes) == 1 {
			st.Cursor = row.cursors[w.cfg.EntityTypes[0]]
		}
	}
	st.Rebuild = Rebuild{
		State:            RebuildState(row.state),
		ReplayIDs:        row.ids,
		ShadowGeneration: row.gen,
		Expected:         row.expected,
		Received:         row.received,
		StartedAt:        row.startedAt,
		FinishedAt:       row.finishedAt,
		Error:            row.errText,
	}
	if len(row.ids) > 0 {
		st.Rebuild.ReplayID = row.ids[0]
	}
	if cur != nil && cur.kind == kindRebuild && st.Rebuild.State == RebuildRunning && st.Rebuild.ReplayID == cur.ids[0] {
		st.Rebuild.Expected, st.Rebuild.Received = cur.progress() // fresher than the row
	}
	return st, nil
}
