package web

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"

	"github.com/statemill/statemill/infra/apperr"
)

// ProblemTypeBase prefixes the "type" member of every problem this package
// writes; the apperr code (or "method_not_allowed") follows it. A type per
// code lets clients branch on it without parsing human text. The URI is an
// identifier: RFC 9457 asks clients not to dereference it automatically.
const ProblemTypeBase = "https://statemill.dev/problems/"

// ProblemContentType is the media type of problem details (RFC 9457 §3).
const ProblemContentType = "application/problem+json"

// Problem is the body of every error reply (RFC 9457). RequestID is an
// extension member so a caller can quote it when reporting a failure.
type Problem struct {
	Type      string            `json:"type"`
	Title     string            `json:"title"`
	Status    int               `json:"status"`
	Detail    string            `json:"detail,omitempty"`
	Instance  string            `json:"instance,omitempty"`
	Errors    map[string]string `json:"errors,omitempty"`
	RequestID string            `json:"request_id,omitempty"`
}

// StatusOf is the one place apperr codes map to HTTP statuses. An unknown or
// empty code is a bug and maps to 500.
func StatusOf(code apperr.Code) int {
	switch code {
	case apperr.Invalid:
		return http.StatusUnprocessableEntity
	case apperr.Malformed:
		return http.StatusBadRequest
	case apperr.NotFound:
		return http.StatusNotFound
	case apperr.Conflict:
		return http.StatusConflict
	case apperr.PreconditionFailed:
		return http.StatusPreconditionFailed
	case apperr.TooLarge:
		return http.StatusRequestEntityTooLarge
	case apperr.UnsupportedMedia:
		return http.StatusUnsupportedMediaType
	case apperr.Unavailable:
		return http.StatusServiceUnavailable
	default: // apperr.Internal and anything unknown
		return http.StatusInternalServerError
	}
}

// internalDetail is all a client learns about a 500: the cause may hold SQL,
// hostnames or stack details, so it goes to the log only.
const internalDetail = "internal error; quote the request id when reporting it"

// WriteError writes err as a problem. Errors that are not *apperr.Error are
// classified by apperr.As (their text is never shown). Internal errors are
// logged with the request id and answered with a fixed detail; Unavailable
// errors are logged at warn level and get "Retry-After: 1" so clients back
// off briefly instead of hammering a dependency that is down.
func WriteError(w http.ResponseWriter, r *http.Request, err error) {
	e := apperr.As(err)
	if e == nil { // WriteError(nil) is a caller bug; do not answer 200.
		e = apperr.Errorf(apperr.Internal, "WriteError called with a nil error")
	}
	status := StatusOf(e.Code)
	code := e.Code
	if status == http.StatusInternalServerError {
		code = apperr.Internal
	}
	detail, fields := e.Message, e.Fields

	ctx, attrs := requestAttrs(r)
	switch code {
	case apperr.Internal:
		detail, fields = internalDetail, nil
		slog.ErrorContext(ctx, "internal error", append(attrs, slog.Any("err", e))...)
	case apperr.Unavailable:
		w.Header().Set("Retry-After", "1")
		slog.WarnContext(ctx, "dependency unavailable", append(attrs, slog.Any("err", e))...)
	}
	writeProblem(w, r, status, string(code), detail, fields)
}

// requestAttrs returns the context and the log attributes that identify r
// (r may be nil when no request is at hand).
func requestAttrs(r *http.Request) (ctx context.Context, attrs []any) {
	if r == nil {
		return context.Background(), nil
	}
	ctx = r.Context()
	return ctx, []any{
		slog.String("request_id", RequestIDFrom(ctx)),
		slog.String("method", r.Method),
		slog.String("path", r.URL.Path),
	}
}

// writeProblem renders one problem. typ is the last segment of the type URI.
func writeProblem(w http.ResponseWriter, r *http.Request, status int, typ, detail string, fields map[string]string) {
	p := Problem{
		Type:   ProblemTypeBase + typ,
		Title:  http.StatusText(status),
		Status: status,
		Detail: detail,
		Errors: fields,
	}
	if r != nil {
		p.Instance = r.URL.Path
		p.RequestID = RequestIDFrom(r.Context())
	}
	body, err := json.Marshal(p)
	if err != nil { // cannot happen for strings and ints; stay safe anyway
		body = []byte(`{"type":"about:blank","title":"Internal Server Error","status":500}`)
		status = http.StatusInternalServerError
	}
	h := w.Header()
	h.Set("Content-Type", ProblemContentType)
	h.Set("X-Content-Type-Options", "nosniff") // the body may echo the path
	h.Del("Content-Length")                    // a handler may have set one for another body
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// WriteJSON writes v as a JSON body with the given status. v is encoded
// before anything is written, so an unencodable value still yields a clean
// 500 problem instead of a half-written 200. Statuses without a body (204,
// 304) write only the header.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	if status == http.StatusNoContent || status == http.StatusNotModified {
		w.WriteHeader(status)
		return
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		slog.Error("encode JSON response", slog.Any("err", err))
		writeProblem(w, nil, http.StatusInternalServerError, string(apperr.Internal), internalDetail, nil)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
