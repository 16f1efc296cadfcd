package replay

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
)

// Status is where a recorded request stands.
type Status string

const (
	StatusPending Status = "pending" // recorded, waiting for a worker
	StatusRunning Status = "running" // a worker is publishing it
	StatusDone    Status = "done"    // every event and both markers are confirmed
	StatusFailed  Status = "failed"  // given up after MaxAttempts or a permanent error
)

// Record is a recorded request and its outcome (table replay_requests).
type Record struct {
	Request
	Status Status `json:"status"`
	// Count and Cursor are those of the replay_completed marker once done.
	Count       int64      `json:"count"`
	Cursor      string     `json:"cursor,omitempty"`
	Error       string     `json:"error,omitempty"`
	Attempts    int        `json:"attempts"`
	RequestedAt time.Time  `json:"requested_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	HeartbeatAt *time.Time `json:"heartbeat_at,omitempty"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
}

// requestStore keeps the table replay_requests of one store (postgres.go,
// sqlite.go). Methods that change a claimed row match it by replay id,
// claim token and status running, and report ok = false when no row
// matched (another responder took it over). Errors are the store's own;
// classify turns an outage into apperr.Unavailable.
type requestStore interface {
	// insert records req unless its replay id is recorded (inserted false).
	insert(ctx context.Context, req Request) (inserted bool, err error)
	// get returns the recorded request id (a canonical UUID); found false
	// when there is none.
	get(ctx context.Context, id string) (rec Record, found bool, err error)
	// claimable lists up to limit ids a worker may take, oldest first:
	// pending ones, and running ones whose heartbeat is older than stale.
	claimable(ctx context.Context, stale time.Duration, limit int) ([]string, error)
	// claim marks id running under token if it is claimable; it returns the
	// request and its pinned cursor token ("" when none yet).
	claim(ctx context.Context, id, token string, stale time.Duration) (req Request, cursor string, ok bool, err error)
	beat(ctx context.Context, id, token string) (ok bool, err error)
	// beginAttempt pins cursor and counts one more attempt.
	beginAttempt(ctx context.Context, id, token, cursor string) (ok bool, err error)
	finish(ctx context.Context, id, token string, status Status, count int64, errText string) (ok bool, err error)
	// release hands a running request back: pending, no claim.
	release(ctx context.Context, id, token string) (ok bool, err error)
	// prune deletes up to 1000 requests finished longer than retention ago.
	prune(ctx context.Context, retention time.Duration) (int64, error)
	classify(err error) error
}

// historySource reads the history a replay publishes, from one store.
type historySource interface {
	// checkAfter refuses a cursor this store cannot continue from (one of
	// the other store, an impossible one) with apperr.Field("after", ...);
	// other errors are classified.
	checkAfter(ctx context.Context, c Cursor) error
	// open starts one attempt's consistent read of j's history: every
	// transition of j.EntityType (mode full) or the newest of each entity
	// (mode latest), not seen by after when it is set, and, when j.pinned
	// is set (a resumed replay), only what that cursor saw.
	open(ctx context.Context, j job, after *Cursor) (historyRead, error)
	// permanent reports an error of this store that no retry can fix.
	permanent(err error) bool
}

// historyRead is one attempt's read. Its count and its events agree,
// whatever commits meanwhile.
type historyRead interface {
	// cursor is what the read covers: j.pinned when set, else the read's
	// own position (pinned by the responder before anything is published).
	cursor() Cursor
	// count is the number of events yields.
	count(ctx context.Context) (int64, error)
	// events yields the events in sequence order, holding a bounded number
	// in memory; it stops at the first error.
	events(ctx context.Context) iter.Seq2[envelope.Event, error]
	// end ends the read once every event was yielded.
	end(ctx context.Context) error
	// close releases the read; safe after end and more than once.
	close()
}

// errForeignCursor means a recorded cursor is of the other store's kind: a
// request recorded by a responder on another store. No retry helps.
var errForeignCursor = errors.New("replay: the cursor was made by another kind of store")

// Submit validates req (apperr.Invalid with one message per field, against
// the configured entity types), records it and hands it to the worker pool;
// it never waits for the replay. It is idempotent by replay_id: submitting
// a recorded request again returns it as recorded and runs nothing, and a
// different request under a used replay_id is an apperr.Conflict. A database
// outage is apperr.Unavailable.
func (r *Responder) Submit(ctx context.Context, req Request) (Request, error) {
	if err := req.Normalize(r.cfg.EntityTypes); err != nil {
		return req, err
	}
	req.ReplayID = uuid.MustParse(req.ReplayID).String() // canonical, as PostgreSQL returns it
	if req.After != "" {
		// The token's shape is checked above; the store checks that it can
		// continue from it (its kind; PostgreSQL the snapshot's arithmetic,
		// xmin ≤ xmax ...): refuse it now, not as a failed replay later.
		c, _ := ParseCursor(req.After)
		if err := r.history.checkAfter(ctx, c); err != nil {
			return req, err
		}
	}
	inserted, err := r.requests.insert(ctx, req)
	if err != nil {
		return req, r.requests.classify(fmt.Errorf("replay: record request: %w", err))
	}
	if inserted {
		r.log.InfoContext(ctx, "replay requested", "replay_id", req.ReplayID, "prefix", req.Prefix,
			"entity_type", req.EntityType, "mode", req.Mode, "after", req.After != "")
		r.enqueue(req.ReplayID)
		return req, nil
	}
	rec, err := r.Get(ctx, req.ReplayID)
	if err != nil {
		return req, err
	}
	if rec.Request != req {
		return req, apperr.Errorf(apperr.Conflict, "replay_id %s was already used for another request", req.ReplayID)
	}
	return rec.Request, nil
}

// Get returns the recorded request replayID (apperr.NotFound when none).
func (r *Responder) Get(ctx context.Context, replayID string) (Record, error) {
	id, err := uuid.Parse(replayID)
	if err != nil {
		return Record{}, apperr.Errorf(apperr.NotFound, "no replay %q", replayID)
	}
	rec, found, err := r.requests.get(ctx, id.String())
	if err != nil {
		return Record{}, r.requests.classify(fmt.Errorf("replay: get %s: %w", replayID, err))
	}
	if !found {
		return Record{}, apperr.Errorf(apperr.NotFound, "no replay %s", replayID)
	}
	return rec, nil
}

// job is a claimed request.
type job struct {
	Request
	claim string
	// pinned is the cursor an earlier attempt read (nil before the first):
	// a resumed replay sends exactly what that one set out to send.
	pinned *Cursor
}

// claimable lists request ids a worker may take, oldest first.
func (r *Responder) claimable(ctx context.Context, limit int) ([]string, error) {
	ids, err := r.requests.claimable(ctx, r.cfg.StaleAfter, limit)
	if err != nil {
		return nil, fmt.Errorf("replay: list unfinished: %w", err)
	}
	return ids, nil
}

// claim marks request id running under a fresh claim token, unless another
// worker holds it (or it is finished): then ok is false.
func (r *Responder) claim(ctx context.Context, id string) (j job, ok bool, err error) {
	j.claim = uuid.NewString()
	req, cursor, ok, err := r.requests.claim(ctx, id, j.claim, r.cfg.StaleAfter)
	if err != nil {
		return job{}, false, fmt.Errorf("replay: claim %s: %w", id, err)
	}
	if !ok {
		return job{}, false, nil
	}
	j.Request = req
	if cursor != "" {
		c, err := ParseCursor(cursor)
		if err != nil {
			return job{}, false, fmt.Errorf("replay: %s has a corrupt cursor: %w", id, err)
		}
		j.pinned = &c
	}
	return j, true, nil
}

// errLostClaim means another responder took the request over (this one's
// heartbeat went stale): this worker must stop publishing it.
var errLostClaim = errors.New("replay: the request was taken over by another responder")

// claimed turns the outcome of a change to the claimed row into an error:
// errLostClaim when the row is no longer this worker's.
func claimed(j job, ok bool, err error) error {
	if err != nil {
		return fmt.Errorf("replay: update %s: %w", j.ReplayID, err)
	}
	if !ok {
		return errLostClaim
	}
	return nil
}

func (r *Responder) beat(ctx context.Context, j job) error {
	ok, err := r.requests.beat(ctx, j.ReplayID, j.claim)
	return claimed(j, ok, err)
}

// beginAttempt pins the cursor before anything is published and counts the attempt.
func (r *Responder) beginAttempt(ctx context.Context, j job, cursor string) error {
	ok, err := r.requests.beginAttempt(ctx, j.ReplayID, j.claim, cursor)
	return claimed(j, ok, err)
}

func (r *Responder) finish(ctx context.Context, j job, status Status, count int64, errText string) error {
	ok, err := r.requests.finish(ctx, j.ReplayID, j.claim, status, count, errText)
	return claimed(j, ok, err)
}

// release hands an interrupted request back, to be resumed at the next start.
func (r *Responder) release(ctx context.Context, j job) error {
	ok, err := r.requests.release(ctx, j.ReplayID, j.claim)
	return claimed(j, ok, err)
}

// prune deletes finished requests older than Retention, a bounded number
// per call.
func (r *Responder) prune(ctx context.Context) (int64, error) {
	n, err := r.requests.prune(ctx, r.cfg.Retention)
	if err != nil {
		return 0, fmt.Errorf("replay: prune: %w", err)
	}
	return n, nil
}
