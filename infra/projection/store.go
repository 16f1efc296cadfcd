package projection

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/infra/envelope"
)

// store is the runtime's side of the read-model database: the state row of
// one worker (generations, rebuild, cursors), the progress counters, and the
// transactions that hand events to the Projection.
//
// Locking: every batch transaction first takes the state row FOR SHARE, so
// it sees one consistent (active, shadow) pair; the switch that starts a
// rebuild, the swap and an abandon take it FOR UPDATE, so each waits for the
// batches in flight and the next batch sees the new pair. Batch transactions
// never update the state row (a FOR SHARE upgraded to an update by two
// concurrent batches would deadlock); they count progress in ProgressTable,
// in rows keyed by (name, generation, source), where source is "live" or
// "replay-<n>", so the live and the replay consumers never write the same
// progress row.
type store struct {
	pool     *pgxpool.Pool
	proj     Projection
	name     string
	schema   string
	state    string // quoted state table
	progress string // quoted progress table
	lockKey  string
}

func newStore(c Config) *store {
	return &store{
		pool: c.Pool, proj: c.Projection, name: c.Name, schema: c.Schema,
		state:    table(c.Schema, StateTable),
		progress: table(c.Schema, ProgressTable),
		lockKey:  "statemill.projection/" + c.Schema + "/" + c.Name,
	}
}

// errRunGone means the state row no longer names the replay being applied:
// it was swapped in, abandoned, or replaced by another process's rebuild.
var errRunGone = errors.New("projection: the replay is no longer the running one")

// inTx runs fn in a transaction and commits it when fn returns nil.
func (s *store) inTx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { // a no-op after Commit
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = tx.Rollback(rctx)
	}()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// ensure creates the schema and tables if they are missing (checking first,
// so a role without CREATE works once they exist), and the worker's state
// row. It reports whether the row is new.
func (s *store) ensure(ctx context.Context) (created bool, err error) {
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		var haveState, haveProgress bool
		if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL`,
			s.state, s.progress).Scan(&haveState, &haveProgress); err != nil {
			return fmt.Errorf("projection: check tables: %w", err)
		}
		if !haveState || !haveProgress {
			// Concurrent starts (several workers on one database) would race
			// on the catalog; serialise them.
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('statemill.projection.ddl', 0))`); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{s.schema}.Sanitize()); err != nil {
				return fmt.Errorf("projection: create schema %s: %w", s.schema, err)
			}
			if _, err := tx.Exec(ctx, `
				CREATE TABLE IF NOT EXISTS `+s.state+` (
					name                text PRIMARY KEY,
					active_generation   bigint NOT NULL,
					shadow_generation   bigint,
					cursors             jsonb NOT NULL DEFAULT '{}',
					rebuild_state       text NOT NULL DEFAULT 'idle',
					rebuild_replay_ids  text[] NOT NULL DEFAULT '{}',
					rebuild_generation  bigint NOT NULL DEFAULT 0,
					rebuild_expected    bigint NOT NULL DEFAULT 0,
					rebuild_received    bigint NOT NULL DEFAULT 0,
					rebuild_started_at  timestamptz,
					rebuild_finished_at timestamptz,
					rebuild_error       text NOT NULL DEFAULT ''
				)`); err != nil {
				return fmt.Errorf("projection: create %s: %w", s.state, err)
			}
			if _, err := tx.Exec(ctx, `
				CREATE TABLE IF NOT EXISTS `+s.progress+` (
					name          text NOT NULL,
					generation    bigint NOT NULL,
					source        text NOT NULL,
					applied       bigint NOT NULL DEFAULT 0,
					last_event_at timestamptz,
					PRIMARY KEY (name, generation, source)
				)`); err != nil {
				return fmt.Errorf("projection: create %s: %w", s.progress, err)
			}
		}
		tag, err := tx.Exec(ctx, `INSERT INTO `+s.state+` (name, active_generation) VALUES ($1, 1) ON CONFLICT (name) DO NOTHING`, s.name)
		if err != nil {
			return fmt.Errorf("projection: insert state row: %w", err)
		}
		created = tag.RowsAffected() == 1
		return nil
	})
	return created, err
}

// generations reads the state row FOR SHARE: the first statement of every
// batch transaction.
func (s *store) generations(ctx context.Context, tx pgx.Tx) (active int64, shadow *int64, err error) {
	err = tx.QueryRow(ctx, `SELECT active_generation, shadow_generation FROM `+s.state+` WHERE name = $1 FOR SHARE`,
		s.name).Scan(&active, &shadow)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil, fmt.Errorf("projection: state row of %q is missing", s.name)
	}
	return active, shadow, err
}

// count adds n applied events to the progress rows of gens for source.
func (s *store) count(ctx context.Context, tx pgx.Tx, gens []int64, source string, n int, last time.Time) error {
	var lastAt *time.Time
	if !last.IsZero() {
		lastAt = &last
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO `+s.progress+` AS p (name, generation, source, applied, last_event_at)
		SELECT $1::text, g, $3::text, $4::bigint, $5::timestamptz FROM unnest($2::bigint[]) AS g
		ON CONFLICT (name, generation, source) DO UPDATE SET
			applied = p.applied + EXCLUDED.applied,
			last_event_at = GREATEST(p.last_event_at, EXCLUDED.last_event_at)`,
		s.name, gens, source, n, lastAt)
	return err
}

// applyLive applies a batch of live events to the active generation and,
// while a rebuild runs, to its shadow too, in one transaction.
func (s *store) applyLive(ctx context.Context, events []envelope.Event) error {
	last := newest(events)
	return s.inTx(ctx, func(tx pgx.Tx) error {
		active, shadow, err := s.generations(ctx, tx)
		if err != nil {
			return err
		}
		gens := []int64{active}
		if shadow != nil {
			gens = append(gens, *shadow)
		}
		for _, g := range gens {
			if err := s.proj.Apply(ctx, tx, g, events); err != nil {
				return err
			}
		}
		return s.count(ctx, tx, gens, "live", len(events), last)
	})
}

// applyReplay applies a batch of one run's replayed events: to the run's
// shadow generation for a rebuild (errRunGone once that is no longer the
// shadow), to the active generation for a catch-up.
func (s *store) applyReplay(ctx context.Context, r *run, source string, events []envelope.Event) error {
	last := newest(events)
	return s.inTx(ctx, func(tx pgx.Tx) error {
		var active int64
		var shadow *int64
		var ids []string
		if err := tx.QueryRow(ctx, `SELECT active_generation, shadow_generation, rebuild_replay_ids FROM `+s.state+`
			WHERE name = $1 FOR SHARE`, s.name).Scan(&active, &shadow, &ids); err != nil {
			return err
		}
		gen := active
		if r.kind == kindRebuild {
			// The generation number alone is not enough: after a lost lock,
			// another process's rebuild may use the same number.
			if shadow == nil || *shadow != r.gen || !slices.Equal(ids, r.ids) {
				return errRunGone
			}
			gen = r.gen
		}
		if err := s.proj.Apply(ctx, tx, gen, events); err != nil {
			return err
		}
		return s.count(ctx, tx, []int64{gen}, source, len(events), last)
	})
}

func newest(events []envelope.Event) time.Time {
	var t time.Time
	for _, e := range events {
		if e.OccurredAt.After(t) {
			t = e.OccurredAt
		}
	}
	return t
}

// clear deletes generation gen of the read model and its progress rows.
func (s *store) clear(ctx context.Context, gen int64) error {
	return s.inTx(ctx, func(tx pgx.Tx) error {
		if err := s.proj.Clear(ctx, tx, gen); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `DELETE FROM `+s.progress+` WHERE name = $1 AND generation = $2`, s.name, gen)
		return err
	})
}

// failInterrupted marks failed a rebuild the state row says is running
// while this process holds the rebuild lock (so its process is gone), and
// clears its shadow. It returns that shadow generation, or 0.
func (s *store) failInterrupted(ctx context.Context) (stale int64, err error) {
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		var shadow *int64
		if err := tx.QueryRow(ctx, `SELECT shadow_generation FROM `+s.state+` WHERE name = $1 FOR UPDATE`,
			s.name).Scan(&shadow); err != nil {
			return err
		}
		if shadow == nil {
			return nil
		}
		stale = *shadow
		_, err := tx.Exec(ctx, `
			UPDATE `+s.state+` SET shadow_generation = NULL, rebuild_state = 'failed', rebuild_finished_at = now(),
				rebuild_error = 'interrupted: the process running it stopped'
			WHERE name = $1`, s.name)
		return err
	})
	if err != nil || stale == 0 {
		return 0, err
	}
	return stale, s.clear(ctx, stale)
}

// prepareRebuild runs before the switch, under the rebuild lock: a rebuild
// left running by a process that is gone is marked failed, and every
// generation other than the active one is cleared (the next shadow, and
// leftovers of failed clears). It returns the active generation.
func (s *store) prepareRebuild(ctx context.Context) (int64, error) {
	if _, err := s.failInterrupted(ctx); err != nil {
		return 0, err
	}
	var active int64
	if err := s.pool.QueryRow(ctx, `SELECT active_generation FROM `+s.state+` WHERE name = $1`, s.name).Scan(&active); err != nil {
		return 0, err
	}
	stale := []int64{active + 1}
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT generation FROM `+s.progress+` WHERE name = $1 AND generation <> $2`, s.name, active)
	if err != nil {
		return 0, err
	}
	others, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return 0, err
	}
	for _, g := range others {
		if !slices.Contains(stale, g) {
			stale = append(stale, g)
		}
	}
	for _, g := range stale {
		if err := s.clear(ctx, g); err != nil {
			return 0, fmt.Errorf("clear generation %d: %w", g, err)
		}
	}
	return active, nil
}

// switchToShadow starts applying live events to generation active+1 too: it
// sets the shadow and marks the rebuild running.
func (s *store) switchToShadow(ctx context.Context, active int64, ids []string) (shadow int64, err error) {
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		var current int64
		var sh *int64
		if err := tx.QueryRow(ctx, `SELECT active_generation, shadow_generation FROM `+s.state+` WHERE name = $1 FOR UPDATE`,
			s.name).Scan(&current, &sh); err != nil {
			return err
		}
		if current != active || sh != nil {
			return fmt.Errorf("projection: the state of %q changed under the rebuild lock", s.name)
		}
		shadow = active + 1
		_, err := tx.Exec(ctx, `
			UPDATE `+s.state+` SET shadow_generation = $2, rebuild_state = 'running', rebuild_replay_ids = $3,
				rebuild_generation = $2, rebuild_expected = 0, rebuild_received = 0,
				rebuild_started_at = now(), rebuild_finished_at = NULL, rebuild_error = ''
			WHERE name = $1`, s.name, shadow, ids)
		return err
	})
	return shadow, err
}

// lockRunning takes the state row FOR UPDATE and checks it still names r as
// the running rebuild. It returns the active generation.
func (s *store) lockRunning(ctx context.Context, tx pgx.Tx, r *run) (active int64, err error) {
	var shadow *int64
	var state string
	var ids []string
	if err := tx.QueryRow(ctx, `SELECT active_generation, shadow_generation, rebuild_state, rebuild_replay_ids
		FROM `+s.state+` WHERE name = $1 FOR UPDATE`, s.name).Scan(&active, &shadow, &state, &ids); err != nil {
		return 0, err
	}
	if shadow == nil || *shadow != r.gen || state != string(RebuildRunning) || !slices.Equal(ids, r.ids) {
		return 0, errRunGone
	}
	return active, nil
}

// swap makes the shadow of r the active generation, in one transaction, and
// stores the cursors of its replays. It returns the old generation.
func (s *store) swap(ctx context.Context, r *run, cursors map[string]string, expected, received int64) (old int64, err error) {
	js, err := json.Marshal(cursors)
	if err != nil {
		return 0, err
	}
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		var err error
		if old, err = s.lockRunning(ctx, tx, r); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `
			UPDATE `+s.state+` SET active_generation = shadow_generation, shadow_generation = NULL,
				cursors = $2, rebuild_state = 'completed', rebuild_finished_at = now(), rebuild_error = '',
				rebuild_expected = $3, rebuild_received = $4
			WHERE name = $1`, s.name, js, expected, received)
		return err
	})
	return old, err
}

// abandon gives a running rebuild up: the shadow is dropped from the state
// row (live batches stop writing it) and the state becomes failed; the
// active model is untouched. The caller clears the shadow afterwards. It
// returns errRunGone when r is no longer the running rebuild.
func (s *store) abandon(ctx context.Context, r *run, reason string, expected, received int64) error {
	return s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := s.lockRunning(ctx, tx, r); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `
			UPDATE `+s.state+` SET shadow_generation = NULL, rebuild_state = 'failed', rebuild_finished_at = now(),
				rebuild_error = $2, rebuild_expected = $3, rebuild_received = $4
			WHERE name = $1`, s.name, reason, expected, received)
		return err
	})
}

// recordProgress persists a running rebuild's progress for Status readers
// in other processes.
func (s *store) recordProgress(ctx context.Context, r *run, expected, received int64) error {
	_, err := s.pool.Exec(ctx, `
		UPDATE `+s.state+` SET rebuild_expected = $2, rebuild_received = $3
		WHERE name = $1 AND rebuild_state = 'running' AND rebuild_replay_ids = $4`, s.name, expected, received, r.ids)
	return err
}

// mergeCursors stores the cursors of a completed catch-up.
func (s *store) mergeCursors(ctx context.Context, cursors map[string]string) error {
	js, err := json.Marshal(cursors)
	if err != nil {
		return err
	}
	_, err = s.pool.Exec(ctx, `UPDATE `+s.state+` SET cursors = cursors || $2::jsonb WHERE name = $1`, s.name, js)
	return err
}

// row is the state row with the active generation's progress.
type row struct {
	active      int64
	shadow      *int64
	cursors     map[string]string
	state       string
	ids         []string
	gen         int64
	expected    int64
	received    int64
	startedAt   *time.Time
	finishedAt  *time.Time
	errText     string
	applied     int64
	lastEventAt *time.Time
}

func (s *store) read(ctx context.Context) (row, error) {
	var r row
	err := s.pool.QueryRow(ctx, `
		SELECT s.active_generation, s.shadow_generation, s.cursors, s.rebuild_state, s.rebuild_replay_ids,
			s.rebuild_generation, s.rebuild_expected, s.rebuild_received, s.rebuild_started_at,
			s.rebuild_finished_at, s.rebuild_error,
			COALESCE(p.applied, 0), p.last_event_at
		FROM `+s.state+` s
		LEFT JOIN LATERAL (SELECT sum(applied)::bigint AS applied, max(last_event_at) AS last_event_at
			FROM `+s.progress+` WHERE name = s.name AND generation = s.active_generation) p ON true
		WHERE s.name = $1`, s.name).Scan(&r.active, &r.shadow, &r.cursors, &r.state, &r.ids, &r.gen, &r.expected,
		&r.received, &r.startedAt, &r.finishedAt, &r.errText, &r.applied, &r.lastEventAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return row{}, fmt.Errorf("projection: state row of %q is missing (the worker has not started yet)", s.name)
	}
	return r, err
}

// rebuildLock is the session-level advisory lock that makes one rebuild or
// catch-up run at a time per projection, across processes. It lives on a
// connection of its own, outside the pool, for the run's whole duration.
type rebuildLock struct{ conn *pgx.Conn }

// tryLock takes the lock, or reports that another session holds it.
func (s *store) tryLock(ctx context.Context) (*rebuildLock, bool, error) {
	conn, err := pgx.ConnectConfig(ctx, s.pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, false, err
	}
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended($1, 0))`, s.lockKey).Scan(&ok); err != nil || !ok {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, false, err
	}
	return &rebuildLock{conn: conn}, true, nil
}

// alive reports whether the lock's connection (and so the lock) still holds.
func (l *rebuildLock) alive(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return l.conn.Ping(ctx) == nil
}

// release drops the lock and closes its connection. The unlock comes
// first and is answered once the lock is free: closing alone frees it only
// when the server's backend has exited, after Close returns, so a tryLock
// right after (a Rebuild after a refused CatchUp) could still find it held.
func (l *rebuildLock) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = l.conn.Exec(ctx, `SELECT pg_advisory_unlock_all()`)
	_ = l.conn.Close(ctx)
}
