// Package startup lets a service start before its dependencies: it retries
// the steps of a start (migrate, connect) with backoff while they fail for a
// reason that waiting can fix.
package startup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
func (p permanentError) Unwrap() error { return p.err }

// Permanent wraps err so that Retry returns it at once. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

// Retry runs step until it succeeds, fails permanently or ctx ends, waiting
// 100ms, 200ms, ... up to 5s between attempts and logging each failure.
func Retry(ctx context.Context, log *slog.Logger, what string, step func() error) error {
	wait := 100 * time.Millisecond
	for {
		err := step()
		if err == nil {
			return nil
		}
		var p permanentError
		if errors.As(err, &p) {
			return fmt.Errorf("%s: %w", what, p.err)
		}
		log.Warn("start step failed; retrying", "step", what, "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, errors.Join(ctx.Err(), err))
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}
