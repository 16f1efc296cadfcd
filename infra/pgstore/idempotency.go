package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/statemill/statemill/infra/store"
)

// Outcome is store.Outcome, kept under this name for existing callers.
type Outcome = store.Outcome

var (
	_ store.Idempotent = (*Tx)(nil)
	_ store.Locker     = (*Tx)(nil)
	_ store.Recaller   = (*Store)(nil)
)

// Recall serialises the commands that carry key (an advisory lock, which
// takes no xid, held to the end of the transaction) and returns the outcome
// a committed command with that key recorded, if any. Call it first; a
// command that finds an outcome must return it without firing.
func (tx *Tx) Recall(ctx context.Context, key string) (Outcome, bool, error) {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('idempotency/' || $1, 0))`, key); err != nil {
		return Outcome{}, false, fmt.Errorf("lock idempotency key: %w", err)
	}
	var o Outcome
	err := tx.QueryRow(ctx, `SELECT fingerprint, response FROM idempotency_keys WHERE key = $1`, key).Scan(&o.Fingerprint, &o.Response)
	if errors.Is(err, pgx.ErrNoRows) {
		return Outcome{}, false, nil
	}
	if err != nil {
		return Outcome{}, false, fmt.Errorf("recall idempotency key: %w", err)
	}
	return o, true, nil
}

// Remember records the outcome of this transaction's command under key; it
// commits with the command or not at all.
func (tx *Tx) Remember(ctx context.Context, key string, o Outcome) error {
	if _, err := tx.Exec(ctx, `INSERT INTO idempotency_keys (key, fingerprint, response) VALUES ($1, $2, $3)`,
		key, o.Fingerprint, o.Response); err != nil {
		return fmt.Errorf("remember idempotency key: %w", err)
	}
	return nil
}

// Recall returns the outcome recorded under key outside a command, for a
// fast answer to a retry.
func (s *Store) Recall(ctx context.Context, key string) (Outcome, bool, error) {
	var o Outcome
	err := s.pool.QueryRow(ctx, `SELECT fingerprint, response FROM idempotency_keys WHERE key = $1`, key).Scan(&o.Fingerprint, &o.Response)
	if errors.Is(err, pgx.ErrNoRows) {
		return Outcome{}, false, nil
	}
	if err != nil {
		return Outcome{}, false, Classify(fmt.Errorf("recall idempotency key: %w", err))
	}
	return o, true, nil
}

// ForgetOutcomes deletes outcomes recorded before now-age: a retry later
// than that runs as a new request.
func (s *Store) ForgetOutcomes(ctx context.Context, age time.Duration) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)`, age.Seconds())
	if err != nil {
		return 0, Classify(fmt.Errorf("forget idempotency keys: %w", err))
	}
	return tag.RowsAffected(), nil
}
