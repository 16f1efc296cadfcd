package web

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// CheckTimeout bounds each health check: a probe must answer quickly even
// when a dependency hangs, or the orchestrator's own timeout hides which
// dependency it was.
const CheckTimeout = time.Second

// Health is the body of a health reply: Status is "ok" or "unavailable";
// Checks maps each check to "ok", "failed" or "timeout".
type Health struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks"`
}

// HealthHandler runs every check concurrently, each with a context that ends
// after CheckTimeout, and answers 200 when all pass or 503 naming the ones
// that did not. A check that ignores its context is reported as "timeout"
// and left to finish on its own; one that panics is "failed". The errors
// themselves go to the log only: they may name hosts or credentials, and the
// endpoint is usually reachable by anyone who can reach the service.
func HealthHandler(checks map[string]func(context.Context) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		type result struct {
			name string
			err  error
		}
		ctx, cancel := context.WithTimeout(r.Context(), CheckTimeout)
		defer cancel()
		results := make(chan result, len(checks)) // buffered: late checks never block
		for name, check := range checks {
			go func() {
				defer func() {
					if p := recover(); p != nil {
						results <- result{name, fmt.Errorf("check panicked: %v", p)}
					}
				}()
				results <- result{name, check(ctx)}
			}()
		}

		h := Health{Status: "ok", Checks: make(map[string]string, len(checks))}
		for name := range checks {
			h.Checks[name] = "timeout" // until it reports
		}
		// A little grace after the deadline lets well-behaved checks report
		// their context error instead of racing the timer.
		grace := time.NewTimer(CheckTimeout + 100*time.Millisecond)
		defer grace.Stop()
	collect:
		for range checks {
			select {
			case res := <-results:
				switch {
				case res.err == nil:
					h.Checks[res.name] = "ok"
				case errors.Is(res.err, context.DeadlineExceeded):
					h.Checks[res.name] = "timeout"
				default:
					h.Checks[res.name] = "failed"
				}
				if res.err != nil {
					slog.WarnContext(r.Context(), "health check failed",
						slog.String("check", res.name), slog.Any("err", res.err),
						slog.String("request_id", RequestIDFrom(r.Context())))
				}
			case <-grace.C:
				break collect
			}
		}
		status := http.StatusOK
		for _, v := range h.Checks {
			if v != "ok" {
				h.Status, status = "unavailable", http.StatusServiceUnavailable
				break
			}
		}
		w.Header().Set("Cache-Control", "no-store")
		WriteJSON(w, status, h)
	})
}
