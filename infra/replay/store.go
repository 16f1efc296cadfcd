package replay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/pgstore"
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
		// The token's shape is checked above; PostgreSQL also checks the
		// snapshot's arithmetic (xmin ≤ xmax ...): refuse it now, not as a
		// failed replay later.
		c, _ := ParseCursor(req.After)
		if _, err := r.cfg.Pool.Exec(ctx, `SELECT $1::text::pg_snapshot`, c.Snapshot); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code[:2] == "22" {
				return req, apperr.Field("after", "is not a replay cursor")
			}
			return req, pgstore.Classify(fmt.Errorf("replay: check cursor: %w", err))
		}
	}
	tag, err := r.cfg.Pool.Exec(ctx, `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, "after", mode)
		VALUES ($1, $2, $3, $4, $5) ON CONFLICT (replay_id) DO NOTHING`,
		req.ReplayID, req.Prefix, req.EntityType, req.After, string(req.Mode))
	if err != nil {
		return req, pgstore.Classify(fmt.Errorf("replay: record request: %w", err))
	}
	if tag.RowsAffected() == 1 {
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
	if uuid.Validate(replayID) != nil {
		return Record{}, apperr.Errorf(apperr.NotFound, "no replay %q", replayID)
	}
	var (
		rec    Record
		mode   string
		count  *int64
		cursor *string
		errTxt *string
	)
	err := r.cfg.Pool.QueryRow(ctx, `
		SELECT replay_id::text, prefix, entity_type, "after", mode, status, count, "cursor", error, attempts,
		       requested_at, started_at, heartbeat_at, finished_at
		FROM replay_requests WHERE replay_id = $1`, replayID).Scan(
		&rec.ReplayID, &rec.Prefix, &rec.EntityType, &rec.After, &mode, &rec.Status, &count, &cursor, &errTxt,
		&rec.Attempts, &rec.RequestedAt, &rec.StartedAt, &rec.HeartbeatAt, &rec.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Record{}, apperr.Errorf(apperr.NotFound, "no replay %s", replayID)
	}
	if err != nil {
		return Record{}, pgstore.Classify(fmt.Errorf("replay: get %s: %w", replayID, err))
	}
	rec.Mode = Mode(mode)
	if count != nil {
		rec.Count = *count
	}
	if cursor != nil {
		rec.Cursor = *cursor
	}
	if errTxt != nil {
		rec.Error = *errTxt
	}
	return rec, nil
}

// job is a claimed request.
type job struct {
	Request
	claim string
	// pinned is the snapshot (pg_snapshot text) an earlier attempt read:
	// a resumed replay sends exactly what that one set out to send.
	pinned string
}

// staleClause selects the requests a worker may take: pending ones, and
// running ones whose responder stopped beating. $n is StaleAfter in seconds.
func staleClause(n int) string {
	return fmt.Sprintf(`(status = 'pending' OR (status = 'running'
		AND coalesce(heartbeat_at, '-infinity') < now() - make_interval(secs => $%d)))`, n)
}

// claimable lists request ids a worker may take, oldest first.
func (r *Responder) claimable(ctx context.Context, limit int) ([]string, error) {
	rows, err := r.cfg.Pool.Query(ctx, `SELECT replay_id::text FROM replay_requests WHERE `+staleClause(1)+`
		ORDER BY requested_at LIMIT $2`, r.cfg.StaleAfter.Seconds(), limit)
	if err != nil {
		return nil, fmt.Errorf("replay: list unfinished: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("replay: list unfinished: %w", err)
	}
	return ids, nil
}

// claim marks request id running under a fresh claim token, unless another
// worker holds it (or it is finished): then ok is false.
func (r *Responder) claim(ctx context.Context, id string) (j job, ok bool, err error) {
	j.claim = uuid.NewString()
	var mode, cursor string
	err = r.cfg.Pool.QueryRow(ctx, `
		UPDATE replay_requests
		SET status = 'running', claim = $2, started_at = coalesce(started_at, now()), heartbeat_at = now()
		WHERE replay_id = $1 AND `+staleClause(3)+`
		RETURNING replay_id::text, prefix, entity_type, "after", mode, coalesce("cursor", '')`,
		id, j.claim, r.cfg.StaleAfter.Seconds()).Scan(&j.ReplayID, &j.Prefix, &j.EntityType, &j.After, &mode, &cursor)
	if errors.Is(err, pgx.ErrNoRows) {
		return job{}, false, nil
	}
	if err != nil {
		return job{}, false, fmt.Errorf("replay: claim %s: %w", id, err)
	}
	j.Mode = Mode(mode)
	if cursor != "" {
		c, err := ParseCursor(cursor)
		if err != nil {
			return job{}, false, fmt.Errorf("replay: %s has a corrupt cursor: %w", id, err)
		}
		j.pinned = c.Snapshot
	}
	return j, true, nil
}

// errLostClaim means another responder took the request over (this one's
// heartbeat went stale): this worker must stop publishing it.
var errLostClaim = errors.New("replay: the request was taken over by another responder")

// update runs a statement on the claimed row and reports errLostClaim when
// the row is no longer this worker's.
func (r *Responder) update(ctx context.Context, j job, sql string, args ...any) error {
	tag, err := r.cfg.Pool.Exec(ctx, sql, append([]any{j.ReplayID, j.claim}, args...)...)
	if err != nil {
		return fmt.Errorf("replay: update %s: %w", j.ReplayID, err)
	}
	if tag.RowsAffected() == 0 {
		return errLostClaim
	}
	return nil
}

const whereClaimed = ` WHERE replay_id = $1 AND claim = $2 AND status = 'running'`

func (r *Responder) beat(ctx context.Context, j job) error {
	return r.update(ctx, j, `UPDATE replay_requests SET heartbeat_at = now()`+whereClaimed)
}

// beginAttempt pins the cursor before anything is published and counts the attempt.
func (r *Responder) beginAttempt(ctx context.Context, j job, cursor string) error {
	return r.update(ctx, j, `UPDATE replay_requests
		SET "cursor" = $3, attempts = attempts + 1, heartbeat_at = now()`+whereClaimed, cursor)
}

func (r *Responder) finish(ctx context.Context, j job, status Status, count int64, errText string) error {
	var e *string
	if errText != "" {
		e = &errText
	}
	return r.update(ctx, j, `UPDATE replay_requests
		SET status = $3, count = $4, error = $5, finished_at = now(), heartbeat_at = now(), claim = NULL`+whereClaimed,
		string(status), count, e)
}

// release hands an interrupted request back, to be resumed at the next start.
func (r *Responder) release(ctx context.Context, j job) error {
	return r.update(ctx, j, `UPDATE replay_requests SET status = 'pending', claim = NULL`+whereClaimed)
}

// prune deletes finished requests older than Retention, a bounded number
// per call.
func (r *Responder) prune(ctx context.Context) (int64, error) {
	tag, err := r.cfg.Pool.Exec(ctx, `
		DELETE FROM replay_requests WHERE replay_id IN (
			SELECT replay_id FROM replay_requests
			WHERE status IN ('done', 'failed') AND finished_at < now() - make_interval(secs => $1)
			LIMIT 1000)`, r.cfg.Retention.Seconds())
	if err != nil {
		return 0, fmt.Errorf("replay: prune: %w", err)
	}
	return tag.RowsAffected(), nil
}
