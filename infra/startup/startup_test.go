package startup

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestRetryUntilSuccess(t *testing.T) {
	calls := 0
	err := Retry(context.Background(), quiet, "step", func() error {
		calls++
		if calls < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("err %v after %d calls", err, calls)
	}
}

func TestRetryStopsOnPermanent(t *testing.T) {
	cause := errors.New("bad migration")
	calls := 0
	err := Retry(context.Background(), quiet, "migrate", func() error { calls++; return Permanent(cause) })
	if !errors.Is(err, cause) || calls != 1 {
		t.Fatalf("err %v after %d calls", err, calls)
	}
	if Permanent(nil) != nil {
		t.Fatal("Permanent(nil) must be nil")
	}
}

func TestRetryEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	cause := errors.New("down")
	err := Retry(ctx, quiet, "connect", func() error { return cause })
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, cause) {
		t.Fatalf("err %v", err)
	}
}
