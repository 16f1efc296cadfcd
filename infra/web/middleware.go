package web

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
)

// Chain wraps h in middleware, the first one outermost:
// Chain(h, a, b) is a(b(h)).
func Chain(h http.Handler, mw ...func(http.Handler) http.Handler) http.Handler {
	for i := len(mw) - 1; i >= 0; i-- {
		h = mw[i](h)
	}
	return h
}

// RequestIDHeader carries the correlation id in and out.
const RequestIDHeader = "X-Request-ID"

// maxRequestIDLen bounds a client-chosen id: it lands in every log line and
// event, so an unbounded one would be a cheap amplification.
const maxRequestIDLen = 128

type requestIDKey struct{}

// RequestID makes every request carry an id: the client's X-Request-ID when
// it is sane (1 to 128 visible ASCII characters, no spaces or control
// characters, so it cannot forge log lines), otherwise a fresh UUIDv7. The id
// is echoed in the response header and available via RequestIDFrom.
func RequestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(RequestIDHeader)
		if !saneRequestID(id) {
			id = newRequestID()
		}
		w.Header().Set(RequestIDHeader, id)
		next.ServeHTTP(w, r.WithContext(WithRequestID(r.Context(), id)))
	})
}

func saneRequestID(id string) bool {
	if len(id) == 0 || len(id) > maxRequestIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

func newRequestID() string {
	if id, err := uuid.NewV7(); err == nil { // time-ordered: sorts like the logs
		return id.String()
	}
	return uuid.NewString()
}

// WithRequestID returns ctx carrying id, for code that starts work outside an
// HTTP request (a message consumer, a test) but wants the same correlation.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestIDFrom returns the id RequestID put into ctx, or "".
func RequestIDFrom(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// Recover turns a panic in next into a logged error (with stack and request
// id) and a 500 problem. If the handler already started its reply, a clean
// problem is impossible, so the connection is aborted instead
// (http.ErrAbortHandler): the client then sees a broken reply, not a
// truncated one that looks complete. http.ErrAbortHandler itself passes
// through untouched, as net/http intends.
func Recover(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := wrapWriter(w)
		defer func() {
			p := recover()
			if p == nil {
				return
			}
			if p == http.ErrAbortHandler {
				panic(p)
			}
			ctx, attrs := requestAttrs(r)
			slog.ErrorContext(ctx, "panic serving request", append(attrs,
				slog.String("panic", fmt.Sprint(p)),
				slog.String("stack", string(debug.Stack())))...)
			if sw.wroteHeader {
				panic(http.ErrAbortHandler)
			}
			writeProblem(sw, r, http.StatusInternalServerError, string(apperr.Internal), internalDetail, nil)
		}()
		next.ServeHTTP(sw, r)
	})
}

// Log writes one slog line per request: method, route pattern, path, status,
// bytes, duration and request id. 5xx replies log at warn level (their cause
// was logged at error level where it happened). It reads slog.Default at
// request time, so a logger configured after wiring is honoured.
func Log(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		r, route := withRoute(r)
		sw := wrapWriter(w)
		finished := false
		defer func() { // deferred: a panic that aborts the reply is logged too
			status := sw.statusOr(finished)
			level := slog.LevelInfo
			if status >= 500 {
				level = slog.LevelWarn
			}
			slog.Default().LogAttrs(r.Context(), level, "http request",
				slog.String("method", r.Method),
				slog.String("route", route.of(r)),
				slog.String("path", r.URL.Path),
				slog.Int("status", status),
				slog.Int64("bytes", sw.bytes),
				slog.Duration("duration", time.Since(start)),
				slog.String("request_id", RequestIDFrom(r.Context())),
			)
		}()
		next.ServeHTTP(sw, r)
		finished = true
	})
}

// routeKey holds a *route in the request context. The matched pattern is
// recorded there by Router, because r.Pattern is set by ServeMux on the
// request it receives, which is a copy whenever a middleware in between
// called r.WithContext.
type routeKey struct{}

type route struct{ pattern string }

// withRoute makes sure r carries a *route that Router can fill in.
func withRoute(r *http.Request) (*http.Request, *route) {
	if rt, ok := r.Context().Value(routeKey{}).(*route); ok {
		return r, rt
	}
	rt := &route{}
	return r.WithContext(context.WithValue(r.Context(), routeKey{}, rt)), rt
}

// setRoute records the matched pattern for the middleware above, if any.
func setRoute(r *http.Request, pattern string) {
	if rt, ok := r.Context().Value(routeKey{}).(*route); ok {
		rt.pattern = pattern
	}
}

// of returns the matched pattern, falling back to r.Pattern (a bare
// ServeMux directly below), then "unmatched" (404, 405, no mux). Patterns,
// unlike paths, are few, so they are safe as log fields and metric labels.
func (rt *route) of(r *http.Request) string {
	switch {
	case rt.pattern != "":
		return rt.pattern
	case r.Pattern != "":
		return r.Pattern
	default:
		return "unmatched"
	}
}

// statusWriter records the status and size of a reply. Middleware share one
// (wrapWriter reuses it), and it keeps Flush and Unwrap so server-sent events
// and http.ResponseController work through it.
type statusWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func wrapWriter(w http.ResponseWriter) *statusWriter {
	if sw, ok := w.(*statusWriter); ok {
		return sw
	}
	return &statusWriter{ResponseWriter: w}
}

func (sw *statusWriter) WriteHeader(code int) {
	if !sw.wroteHeader && code >= 200 { // 1xx are informational, not the reply
		sw.status, sw.wroteHeader = code, true
	}
	sw.ResponseWriter.WriteHeader(code)
}

func (sw *statusWriter) Write(p []byte) (int, error) {
	if !sw.wroteHeader {
		sw.status, sw.wroteHeader = http.StatusOK, true
	}
	n, err := sw.ResponseWriter.Write(p)
	sw.bytes += int64(n)
	return n, err
}

func (sw *statusWriter) Flush() {
	if !sw.wroteHeader {
		sw.status, sw.wroteHeader = http.StatusOK, true
	}
	_ = http.NewResponseController(sw.ResponseWriter).Flush()
}

func (sw *statusWriter) Unwrap() http.ResponseWriter { return sw.ResponseWriter }

// statusOr returns the status sent; with nothing sent it is what net/http
// will send: 200 after a normal return, 500 (an aborted connection) after a
// panic.
func (sw *statusWriter) statusOr(finished bool) int {
	switch {
	case sw.wroteHeader:
		return sw.status
	case finished:
		return http.StatusOK
	default:
		return http.StatusInternalServerError
	}
}
