package replay

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// postgres is the responder's storage on a PostgreSQL store (pgstore's
// schema): requests in replay_requests, history read in one read-only
// REPEATABLE READ snapshot, cursors are pg_snapshots.
type postgres struct{ pool *pgxpool.Pool }

var (
	_ requestStore  = postgres{}
	_ historySource = postgres{}
)

func (p postgres) classify(err error) error { return pgstore.Classify(err) }

func (p postgres) insert(ctx context.Context, req Request) (bool, error) {
	tag, err := p.pool.Exec(ctx, `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, "after", mode, batch)
		VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (replay_id) DO NOTHING`,
		req.ReplayID, req.Prefix, req.EntityType, req.After, string(req.Mode), max(req.Batch, 1))
	if err != nil {
		return false, err
	}
	return tag.RowsAffected() == 1, nil
}

func (p postgres) get(ctx context.Context, id string) (Record, bool, error) {
	var (
		rec    Record
		mode   string
		count  *int64
		cursor *string
		errTxt *string
	)
	err := p.pool.QueryRow(ctx, `
		SELECT replay_id::text, prefix, entity_type, "after", mode, batch, status, count, "cursor", error, attempts,
		       requested_at, started_at, heartbeat_at, finished_at
		FROM replay_requests WHERE replay_id = $1`, id).Scan(
		&rec.ReplayID, &rec.Prefix, &rec.EntityType, &rec.After, &mode, &rec.Batch, &rec.Status, &count, &cursor, &errTxt,
		&rec.Attempts, &rec.RequestedAt, &rec.StartedAt, &rec.HeartbeatAt, &rec.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, err
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
	return rec, true, nil
}

// staleClause selects the requests a worker may take: pending ones, and
// running ones whose responder stopped beating. $n is StaleAfter in seconds.
func staleClause(n int) string {
	return fmt.Sprintf(`(status = 'pending' OR (status = 'running'
		AND coalesce(heartbeat_at, '-infinity') < now() - make_interval(secs => $%d)))`, n)
}

func (p postgres) claimable(ctx context.Context, stale time.Duration, limit int) ([]string, error) {
	rows, err := p.pool.Query(ctx, `SELECT replay_id::text FROM replay_requests WHERE `+staleClause(1)+`
		ORDER BY requested_at LIMIT $2`, stale.Seconds(), limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

func (p postgres) claim(ctx context.Context, id, token string, stale time.Duration) (Request, string, bool, error) {
	var req Request
	var mode, cursor string
	err := p.pool.QueryRow(ctx, `
		UPDATE replay_requests
		SET status = 'running', claim = $2, started_at = coalesce(started_at, now()), heartbeat_at = now()
		WHERE replay_id = $1 AND `+staleClause(3)+`
		RETURNING replay_id::text, prefix, entity_type, "after", mode, batch, coalesce("cursor", '')`,
		id, token, stale.Seconds()).Scan(&req.ReplayID, &req.Prefix, &req.EntityType, &req.After, &mode, &req.Batch, &cursor)
	if errors.Is(err, pgx.ErrNoRows) {
		return Request{}, "", false, nil
	}
	if err != nil {
		return Request{}, "", false, err
	}
	req.Mode = Mode(mode)
	return req, cursor, true, nil
}

// update runs a statement on the claimed row ($1 replay id, $2 claim) and
// reports whether it matched.
func (p postgres) update(ctx context.Context, id, token, sql string, args ...any) (bool, error) {
	tag, err := p.pool.Exec(ctx, sql, append([]any{id, token}, args...)...)
	if err != nil {
		return false, err
	}
	return tag.RowsAffected() > 0, nil
}

const whereClaimed = ` WHERE replay_id = $1 AND claim = $2 AND status = 'running'`

func (p postgres) beat(ctx context.Context, id, token string) (bool, error) {
	return p.update(ctx, id, token, `UPDATE replay_requests SET heartbeat_at = now()`+whereClaimed)
}

func (p postgres) beginAttempt(ctx context.Context, id, token, cursor string) (bool, error) {
	return p.update(ctx, id, token, `UPDATE replay_requests
		SET "cursor" = $3, attempts = attempts + 1, heartbeat_at = now()`+whereClaimed, cursor)
}

func (p postgres) finish(ctx context.Context, id, token string, status Status, count int64, errText string) (bool, error) {
	var e *string
	if errText != "" {
		e = &errText
	}
	return p.update(ctx, id, token, `UPDATE replay_requests
		SET status = $3, count = $4, error = $5, finished_at = now(), heartbeat_at = now(), claim = NULL`+whereClaimed,
		string(status), count, e)
}

func (p postgres) release(ctx context.Context, id, token string) (bool, error) {
	return p.update(ctx, id, token, `UPDATE replay_requests SET status = 'pending', claim = NULL`+whereClaimed)
}

func (p postgres) prune(ctx context.Context, retention time.Duration) (int64, error) {
	tag, err := p.pool.Exec(ctx, `
		DELETE FROM replay_requests WHERE replay_id IN (
			SELECT replay_id FROM replay_requests
			WHERE status IN ('done', 'failed') AND finished_at < now() - make_interval(secs => $1)
			LIMIT 1000)`, retention.Seconds())
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

// checkAfter refuses a cursor of the embedded store, and a snapshot
// PostgreSQL refuses (xmin > xmax ...).
func (p postgres) checkAfter(ctx context.Context, c Cursor) error {
	if c.IsSequence() {
		return apperr.Field("after", "is not a replay cursor")
	}
	if _, err := p.pool.Exec(ctx, `SELECT $1::text::pg_snapshot`, c.Snapshot); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code[:2] == "22" {
			return apperr.Field("after", "is not a replay cursor")
		}
		return pgstore.Classify(fmt.Errorf("replay: check cursor: %w", err))
	}
	return nil
}

// permanent: PostgreSQL refusing the statement itself (bad data, bad SQL).
func (p postgres) permanent(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		class := pgErr.Code[:2]
		return class == "22" || class == "42"
	}
	return false
}

const historyColumns = `event_id, sequence, entity_type, entity_id, version, event, from_state, to_state,
	attributes, occurred_at, correlation_id`

// queries returns the count and the select of a replay under the filter.
// full: every transition of the entity type, by sequence. latest: the newest
// transition of each entity, by sequence. after excludes what the cursor's
// snapshot saw; pinned (a resumed replay) keeps only what the first
// attempt's snapshot saw.
func queries(entityType string, mode Mode, after, pinned string) (count, rows string, args []any) {
	conds := []string{"entity_type = $1"}
	args = []any{entityType}
	if after != "" {
		args = append(args, after)
		conds = append(conds, fmt.Sprintf("NOT pg_visible_in_snapshot(transaction_id, $%d::text::pg_snapshot)", len(args)))
	}
	if pinned != "" {
		args = append(args, pinned)
		conds = append(conds, fmt.Sprintf("pg_visible_in_snapshot(transaction_id, $%d::text::pg_snapshot)", len(args)))
	}
	where := " WHERE " + strings.Join(conds, " AND ")
	if mode == Latest {
		count = `SELECT count(DISTINCT entity_id) FROM history` + where
		rows = `SELECT ` + historyColumns + ` FROM (
			SELECT DISTINCT ON (entity_id) ` + historyColumns + ` FROM history` + where + `
			ORDER BY entity_id, version DESC) latest ORDER BY sequence`
		return count, rows, args
	}
	count = `SELECT count(*) FROM history` + where
	rows = `SELECT ` + historyColumns + ` FROM history` + where + ` ORDER BY sequence`
	return count, rows, args
}

// open begins one read-only REPEATABLE READ snapshot. READ ONLY: the
// transaction never takes an xid, so a long replay does not hold back
// pg_snapshot_xmin (and with it the outbox relay). A fresh replay is
// filtered by the snapshot itself; a resumed one also by its pinned
// snapshot.
func (p postgres) open(ctx context.Context, j job, after *Cursor) (historyRead, error) {
	if (after != nil && after.IsSequence()) || (j.pinned != nil && j.pinned.IsSequence()) {
		return nil, errForeignCursor
	}
	tx, err := p.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("replay: begin snapshot: %w", err)
	}
	var snapshot string
	if err := tx.QueryRow(ctx, `SELECT pg_current_snapshot()::text`).Scan(&snapshot); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("replay: take snapshot: %w", err)
	}
	rd := &pgRead{tx: tx, cur: Cursor{Snapshot: snapshot}}
	var afterSnap, pinnedSnap string
	if after != nil {
		afterSnap = after.Snapshot
	}
	if j.pinned != nil {
		rd.cur = *j.pinned
		pinnedSnap = j.pinned.Snapshot
	}
	rd.countSQL, rd.rowsSQL, rd.args = queries(j.EntityType, j.Mode, afterSnap, pinnedSnap)
	return rd, nil
}

// pgRead is one snapshot; pgx reads the rows as they are consumed, so
// memory stays bounded.
type pgRead struct {
	tx                pgx.Tx
	cur               Cursor
	countSQL, rowsSQL string
	args              []any
}

func (rd *pgRead) cursor() Cursor { return rd.cur }

func (rd *pgRead) count(ctx context.Context) (int64, error) {
	var n int64
	if err := rd.tx.QueryRow(ctx, rd.countSQL, rd.args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("replay: count: %w", err)
	}
	return n, nil
}

func (rd *pgRead) events(ctx context.Context) iter.Seq2[envelope.Event, error] {
	return func(yield func(envelope.Event, error) bool) {
		rows, err := rd.tx.Query(ctx, rd.rowsSQL, rd.args...)
		if err != nil {
			yield(envelope.Event{}, fmt.Errorf("replay: query history: %w", err))
			return
		}
		defer rows.Close()
		for rows.Next() {
			e, err := pgstore.ScanEvent(rows)
			if err != nil {
				yield(envelope.Event{}, fmt.Errorf("replay: scan history: %w", err))
				return
			}
			if !yield(e, nil) {
				return
			}
		}
		if err := rows.Err(); err != nil {
			yield(envelope.Event{}, fmt.Errorf("replay: read history: %w", err))
		}
	}
}

func (rd *pgRead) end(ctx context.Context) error {
	if err := rd.tx.Commit(ctx); err != nil {
		return fmt.Errorf("replay: end snapshot: %w", err)
	}
	return nil
}

func (rd *pgRead) close() {
	_ = rd.tx.Rollback(context.Background()) // after Commit a no-op
}
