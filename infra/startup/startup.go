// Package startup is how a service starts: the settings every service
// reads the same way, and retrying the steps of a start (migrate, connect)
// with backoff while they fail for a reason that waiting can fix, so a
// service starts before its dependencies.
package startup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// LogLevel reads LOG_LEVEL: debug, info, warn or error, any case; empty is
// info.
func LogLevel(v string) (slog.Level, error) {
	level := slog.LevelInfo
	if v == "" {
		return level, nil
	}
	if err := level.UnmarshalText([]byte(strings.ToUpper(v))); err != nil {
		return level, errors.New("LOG_LEVEL must be debug, info, warn or error")
	}
	return level, nil
}

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
