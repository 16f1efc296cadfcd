package replay

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"iter"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sqlitestore"
)

// embedded is the responder's storage on the embedded store (sqlitestore's
// schema). Every write goes through the single writer, reads through the
// read-only pool.
//
// Cursors are history sequences: with one writer at a time sequence order
// is commit order, and history is append-only, so the rows with sequence ≤
// S never change once S is visible. A replay reads max(sequence) = S once
// (pinned before anything is published) and then bounds every query by it;
// its count and its pages agree without holding a transaction open, so a
// long replay neither pins a WAL snapshot (which would stop checkpoints
// from resetting the WAL) nor occupies a connection between pages (for a
// Memory database, or with OneConnection, the reader is the writer, and a
// read transaction held while publishing would stall every command and the
// replay's own heartbeat).
type embedded struct{ db *sqlitestore.DB }

var (
	_ requestStore  = embedded{}
	_ historySource = embedded{}
)

// sqliteTime is how replay_requests' times are written: UTC text of fixed
// width, as sqlitestore stores times, so text order is time order.
const sqliteTime = "2006-01-02T15:04:05.000000Z"

func sqliteNow() string { return time.Now().UTC().Format(sqliteTime) }

func sqliteAgo(d time.Duration) string { return time.Now().Add(-d).UTC().Format(sqliteTime) }

func (s embedded) classify(err error) error { return sqlitestore.Classify(err) }

func (s embedded) insert(ctx context.Context, req Request) (bool, error) {
	res, err := s.db.Writer().ExecContext(ctx, `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, "after", mode, batch, requested_at)
		VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (replay_id) DO NOTHING`,
		req.ReplayID, req.Prefix, req.EntityType, req.After, string(req.Mode), max(req.Batch, 1), sqliteNow())
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

func (s embedded) get(ctx context.Context, id string) (Record, bool, error) {
	var (
		rec                                Record
		mode, status, requested            string
		count                              sql.NullInt64
		cursor, errTxt, started, beat, fin sql.NullString
	)
	err := s.db.Reader().QueryRowContext(ctx, `
		SELECT replay_id, prefix, entity_type, "after", mode, batch, status, count, "cursor", error, attempts,
		       requested_at, started_at, heartbeat_at, finished_at
		FROM replay_requests WHERE replay_id = ?`, id).Scan(
		&rec.ReplayID, &rec.Prefix, &rec.EntityType, &rec.After, &mode, &rec.Batch, &status, &count, &cursor, &errTxt,
		&rec.Attempts, &requested, &started, &beat, &fin)
	if errors.Is(err, sql.ErrNoRows) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, err
	}
	rec.Mode, rec.Status = Mode(mode), Status(status)
	rec.Count, rec.Cursor, rec.Error = count.Int64, cursor.String, errTxt.String
	if rec.RequestedAt, err = parseSQLiteTime(requested); err != nil {
		return Record{}, false, err
	}
	for _, t := range []struct {
		text sql.NullString
		dst  **time.Time
	}{{started, &rec.StartedAt}, {beat, &rec.HeartbeatAt}, {fin, &rec.FinishedAt}} {
		if !t.text.Valid {
			continue
		}
		v, err := parseSQLiteTime(t.text.String)
		if err != nil {
			return Record{}, false, err
		}
		*t.dst = &v
	}
	return rec, true, nil
}

func parseSQLiteTime(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("replay_requests time %q: %w", s, err)
	}
	return t.UTC(), nil
}

// sqliteClaimable selects the requests a worker may take: pending ones, and
// running ones whose heartbeat is older than the bound parameter (a time).
const sqliteClaimable = `(status = 'pending' OR (status = 'running' AND coalesce(heartbeat_at, '') < ?))`

func (s embedded) claimable(ctx context.Context, stale time.Duration, limit int) ([]string, error) {
	rows, err := s.db.Reader().QueryContext(ctx, `SELECT replay_id FROM replay_requests
		WHERE `+sqliteClaimable+` ORDER BY requested_at LIMIT ?`, sqliteAgo(stale), limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

func (s embedded) claim(ctx context.Context, id, token string, stale time.Duration) (Request, string, bool, error) {
	var req Request
	var mode, cursor string
	now := sqliteNow()
	err := s.db.Writer().QueryRowContext(ctx, `
		UPDATE replay_requests
		SET status = 'running', claim = ?, started_at = coalesce(started_at, ?), heartbeat_at = ?
		WHERE replay_id = ? AND `+sqliteClaimable+`
		RETURNING replay_id, prefix, entity_type, "after", mode, batch, coalesce("cursor", '')`,
		token, now, now, id, sqliteAgo(stale)).Scan(&req.ReplayID, &req.Prefix, &req.EntityType, &req.After, &mode, &req.Batch, &cursor)
	if errors.Is(err, sql.ErrNoRows) {
		return Request{}, "", false, nil
	}
	if err != nil {
		return Request{}, "", false, err
	}
	req.Mode = Mode(mode)
	return req, cursor, true, nil
}

// update runs "UPDATE replay_requests SET <set>" on the claimed row; args
// are set's parameters. It reports whether the row matched.
func (s embedded) update(ctx context.Context, id, token, set string, args ...any) (bool, error) {
	res, err := s.db.Writer().ExecContext(ctx, `UPDATE replay_requests SET `+set+`
		WHERE replay_id = ? AND claim = ? AND status = 'running'`, append(args, id, token)...)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

func (s embedded) beat(ctx context.Context, id, token string) (bool, error) {
	return s.update(ctx, id, token, `heartbeat_at = ?`, sqliteNow())
}

func (s embedded) beginAttempt(ctx context.Context, id, token, cursor string) (bool, error) {
	return s.update(ctx, id, token, `"cursor" = ?, attempts = attempts + 1, heartbeat_at = ?`, cursor, sqliteNow())
}

func (s embedded) finish(ctx context.Context, id, token string, status Status, count int64, errText string) (bool, error) {
	var e *string
	if errText != "" {
		e = &errText
	}
	now := sqliteNow()
	return s.update(ctx, id, token, `status = ?, count = ?, error = ?, finished_at = ?, heartbeat_at = ?, claim = NULL`,
		string(status), count, e, now, now)
}

func (s embedded) release(ctx context.Context, id, token string) (bool, error) {
	return s.update(ctx, id, token, `status = 'pending', claim = NULL`)
}

func (s embedded) prune(ctx context.Context, retention time.Duration) (int64, error) {
	res, err := s.db.Writer().ExecContext(ctx, `
		DELETE FROM replay_requests WHERE replay_id IN (
			SELECT replay_id FROM replay_requests
			WHERE status IN ('done', 'failed') AND finished_at < ?
			LIMIT 1000)`, sqliteAgo(retention))
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// maxSequence is the greatest sequence in history (0 when empty): every
// transition committed later has a greater one.
func (s embedded) maxSequence(ctx context.Context) (int64, error) {
	var n int64
	if err := s.db.Reader().QueryRowContext(ctx, `SELECT coalesce(max(sequence), 0) FROM history`).Scan(&n); err != nil {
		return 0, err
	}
	return n, nil
}

// checkAfter refuses a PostgreSQL cursor, and a sequence this history has
// not reached: a cursor of another database (a Memory database restarted,
// a file replaced), after which a replay would silently skip what is new.
func (s embedded) checkAfter(ctx context.Context, c Cursor) error {
	if !c.IsSequence() {
		return apperr.Field("after", "is not a replay cursor")
	}
	top, err := s.maxSequence(ctx)
	if err != nil {
		return sqlitestore.Classify(fmt.Errorf("replay: check cursor: %w", err))
	}
	if c.Sequence > top {
		return apperr.Field("after", "is not a replay cursor of this history")
	}
	return nil
}

// permanent: SQLite refusing the statement itself (bad SQL, a constraint,
// a corrupt file), not an outage or an interruption.
func (s embedded) permanent(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) || sqlitestore.Unavailable(err) {
		return false
	}
	return se.Code()&0xff != sqlite3.SQLITE_INTERRUPT
}

// sqlitePage is how many history rows one query reads: the memory a
// replay holds, and how long the (possibly shared) connection is taken.
const sqlitePage = 512

func (s embedded) open(ctx context.Context, j job, after *Cursor) (historyRead, error) {
	if (after != nil && !after.IsSequence()) || (j.pinned != nil && !j.pinned.IsSequence()) {
		return nil, errForeignCursor
	}
	rd := &sqliteRead{db: s.db, entityType: j.EntityType, latest: j.Mode == Latest}
	if after != nil {
		rd.lo = after.Sequence
	}
	if j.pinned != nil {
		rd.hi = j.pinned.Sequence
	} else {
		top, err := s.maxSequence(ctx)
		if err != nil {
			return nil, fmt.Errorf("replay: read the history's position: %w", err)
		}
		rd.hi = top
	}
	return rd, nil
}

// sqliteRead reads the rows of one entity type with lo < sequence ≤ hi,
// in pages by sequence.
type sqliteRead struct {
	db         *sqlitestore.DB
	entityType string
	latest     bool
	lo, hi     int64
}

func (rd *sqliteRead) cursor() Cursor { return Cursor{Sequence: rd.hi} }

func (rd *sqliteRead) count(ctx context.Context) (int64, error) {
	// full counts over the range of sequences the pages scan (small after
	// a recent cursor); latest over the entity index, which hands out the
	// entities in order, without a temporary table of them.
	q := `SELECT count(*) FROM history WHERE +entity_type = ? AND sequence > ? AND sequence <= ?`
	if rd.latest {
		q = `SELECT count(DISTINCT entity_id) FROM history WHERE entity_type = ? AND sequence > ? AND sequence <= ?`
	}
	var n int64
	err := rd.db.Reader().QueryRowContext(ctx, q, rd.entityType, rd.lo, rd.hi).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("replay: count: %w", err)
	}
	return n, nil
}

// pageSQL selects the next page after a sequence ($2), in sequence order.
// "+entity_type" keeps SQLite from walking the entity index and sorting:
// the scan is a range of the rowid (sequence). latest keeps a row only when
// no newer version of its entity is in (lo, hi].
func (rd *sqliteRead) pageSQL() (string, []any) {
	q := `SELECT event_id, sequence, entity_type, entity_id, version, event, from_state, to_state,
		attributes, occurred_at, correlation_id
		FROM history h WHERE +h.entity_type = ? AND h.sequence > ? AND h.sequence <= ?`
	if rd.latest {
		q += ` AND NOT EXISTS (SELECT 1 FROM history n
			WHERE n.entity_type = h.entity_type AND n.entity_id = h.entity_id AND n.version > h.version
			  AND n.sequence > ? AND n.sequence <= ?)`
		return q + ` ORDER BY h.sequence LIMIT ?`, []any{rd.lo, rd.hi}
	}
	return q + ` ORDER BY h.sequence LIMIT ?`, nil
}

func (rd *sqliteRead) events(ctx context.Context) iter.Seq2[envelope.Event, error] {
	return func(yield func(envelope.Event, error) bool) {
		q, extra := rd.pageSQL()
		page := make([]envelope.Event, 0, sqlitePage)
		for last := rd.lo; ; {
			var err error
			args := append(append([]any{rd.entityType, last, rd.hi}, extra...), sqlitePage)
			if page, err = rd.page(ctx, page[:0], q, args); err != nil {
				yield(envelope.Event{}, err)
				return
			}
			for _, e := range page {
				if !yield(e, nil) {
					return
				}
			}
			if len(page) < sqlitePage {
				return
			}
			last = page[len(page)-1].Sequence
		}
	}
}

// page reads one page into dst and releases the connection before any of
// it is published.
func (rd *sqliteRead) page(ctx context.Context, dst []envelope.Event, q string, args []any) ([]envelope.Event, error) {
	rows, err := rd.db.Reader().QueryContext(ctx, q, args...)
	if err != nil {
		return dst, fmt.Errorf("replay: query history: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		e, err := sqlitestore.ScanEvent(rows)
		if err != nil {
			return dst, fmt.Errorf("replay: scan history: %w", err)
		}
		dst = append(dst, e)
	}
	if err := rows.Err(); err != nil {
		return dst, fmt.Errorf("replay: read history: %w", err)
	}
	return dst, nil
}

func (rd *sqliteRead) end(context.Context) error { return nil }

func (rd *sqliteRead) close() {}
