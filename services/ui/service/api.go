package service

import (
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/liveview"
)

// static holds the page and its assets: the binary needs nothing else, no
// CDN and no internet.
//
//go:embed static
var static embed.FS

// api is the ui's HTTP side.
type api struct {
	model    *liveview.Model
	products *url.URL // the products service
	client   *http.Client
	assets   fs.FS

	heartbeat, retry, historyTimeout time.Duration
	writeTimeout                     time.Duration // of each write to an event stream

	stopping chan struct{} // closed when the server shuts down: streams end
	stopOnce sync.Once
}

// newAPI serves model; products is the products service. cfg has its
// defaults.
func newAPI(model *liveview.Model, products *url.URL, cfg Config) (*api, error) {
	assets, err := fs.Sub(static, "static")
	if err != nil {
		return nil, fmt.Errorf("embedded assets: %w", err)
	}
	return &api{
		model: model, products: products, assets: assets,
		client:    &http.Client{Timeout: cfg.HistoryTimeout},
		heartbeat: cfg.Heartbeat, retry: cfg.Retry, historyTimeout: cfg.HistoryTimeout,
		writeTimeout: streamWriteTimeout,
		stopping:     make(chan struct{}),
	}, nil
}

// routes adds the ui's routes to r, each handler wrapped by wrap.
func (a *api) routes(r *web.Router, wrap func(http.Handler) http.Handler) {
	files := http.StripPrefix("/static/", http.FileServerFS(a.assets))
	handle := func(pattern string, h http.HandlerFunc) { r.Handle(pattern, wrap(h)) }
	handle("GET /{$}", a.page)
	handle("GET /static/", func(w http.ResponseWriter, r *http.Request) {
		// Embedded files carry no modification time, so no validators: ask
		// the browser to check back rather than trust a stale copy.
		w.Header().Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
	handle("GET /ui/events", a.events)
	handle("GET /ui/diagram.svg", a.diagram)
	handle("GET /ui/products", a.list)
	handle("GET /ui/products/{id}/history", a.history)
}

func (a *api) stopStreams() { a.stopOnce.Do(func() { close(a.stopping) }) }

// securityHeaders keeps the page to its own origin: scripts, styles and
// connections from this server only, no framing.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		next.ServeHTTP(w, r)
	})
}

func (a *api) page(w http.ResponseWriter, r *http.Request) {
	body, err := fs.ReadFile(a.assets, "index.html")
	if err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Internal, err, "the page is missing"))
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	_, _ = w.Write(body)
}

func (a *api) diagram(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "image/svg+xml")
	w.Header().Set("Cache-Control", "no-store") // the counts change
	_, _ = w.Write(a.model.Diagram())
}

// listing is GET /ui/products: the model and the state of its feed.
type listing struct {
	liveview.Snapshot
	Status liveview.Status `json:"status"`
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	web.WriteJSON(w, http.StatusOK, listing{Snapshot: a.model.Snapshot(), Status: a.model.Status()})
}

// maxHistoryBytes bounds what the ui reads of a history from the products
// service.
const maxHistoryBytes = 8 << 20

// history proxies GET /api/products/{id}/history of the products service,
// so the browser talks to this origin only. It answers 404 for an unknown
// product and 503 when the products service is unreachable, slow or
// answers something unexpected.
func (a *api) history(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if uuid.Validate(id) != nil {
		web.WriteError(w, r, apperr.Errorf(apperr.NotFound, "no product has the id %q", id))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), a.historyTimeout)
	defer cancel()
	target := a.products.JoinPath("api", "products", id, "history")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target.String(), nil)
	if err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Internal, err, "cannot build the history request"))
		return
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set(web.RequestIDHeader, web.RequestIDFrom(r.Context()))
	res, err := a.client.Do(req)
	if err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Unavailable, err, "the products service did not answer"))
		return
	}
	defer res.Body.Close()
	switch res.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		web.WriteError(w, r, apperr.Errorf(apperr.NotFound, "no product has the id %q", id))
		return
	default:
		web.WriteError(w, r, apperr.Errorf(apperr.Unavailable, "the products service answered %d", res.StatusCode))
		return
	}
	var transitions []envelope.Event
	dec := json.NewDecoder(io.LimitReader(res.Body, maxHistoryBytes))
	if err := dec.Decode(&transitions); err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Unavailable, err, "the products service sent a history the ui cannot read"))
		return
	}
	if transitions == nil {
		transitions = []envelope.Event{}
	}
	w.Header().Set("Cache-Control", "no-store")
	web.WriteJSON(w, http.StatusOK, transitions)
}

// streamWriteTimeout bounds each write to an event stream: a browser that
// stops reading is dropped after it, without holding anything else up.
const streamWriteTimeout = 10 * time.Second

// events is the event stream (text/event-stream) of the page. It opens with
// a "snapshot" of every product, then sends each "change"; every message has
// the id "<epoch>-<seq>" of the stream position after it. A browser that
// reconnects with Last-Event-ID (or last_event_id in the query, for a
// fresh EventSource) gets exactly the changes it missed, or a new snapshot
// when they are no longer kept or the id is not of this instance. "status"
// messages (without an id) tell whether the feed is live or rebuilding, and
// comments keep an idle stream alive.
func (a *api) events(w http.ResponseWriter, r *http.Request) {
	select {
	case <-a.stopping:
		web.WriteError(w, r, apperr.Errorf(apperr.Unavailable, "the ui is shutting down"))
		return
	default:
	}
	rc := http.NewResponseController(w)
	// The server's timeouts are for ordinary requests: its write deadline
	// would cut every stream after 30s, and its read deadline ends the
	// request's context when it passes. Clear both for this stream; each
	// write sets a deadline of its own instead.
	if err := rc.SetWriteDeadline(time.Time{}); err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Internal, err, "this connection cannot stream"))
		return
	}
	if err := rc.SetReadDeadline(time.Time{}); err != nil {
		web.WriteError(w, r, apperr.Wrap(apperr.Internal, err, "this connection cannot stream"))
		return
	}
	watcher := a.model.Watch() // before the first read: no change falls between
	defer watcher.Close()

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no") // a buffering proxy would hold messages back
	w.WriteHeader(http.StatusOK)
	s := &stream{w: w, rc: rc, timeout: a.writeTimeout}
	s.printf("retry: %d\n\n", a.retry.Milliseconds())

	lastID := r.Header.Get("Last-Event-ID")
	if lastID == "" {
		lastID = r.URL.Query().Get("last_event_id")
	}
	var cursor uint64
	if changes, last, ok := a.model.Resume(lastID); lastID != "" && ok {
		s.changes(a.model, changes)
		cursor = last
	} else {
		cursor = s.snapshot(a.model)
	}
	status := a.model.Status()
	s.status(status)
	if err := s.flush(); err != nil {
		return
	}

	beat := time.NewTicker(a.heartbeat)
	defer beat.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-a.stopping:
			return
		case <-watcher.C():
			changes, last, ok := a.model.Since(cursor)
			if ok {
				s.changes(a.model, changes)
				cursor = last
			} else {
				// Too far behind, or the model was reset: start over.
				cursor = s.snapshot(a.model)
			}
			if st := a.model.Status(); st != status {
				status = st
				s.status(st)
			}
		case <-beat.C:
			s.printf(": keep-alive\n\n")
		}
		if err := s.flush(); err != nil {
			return
		}
	}
}

// stream writes server-sent events; the first error sticks and ends it.
type stream struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	err     error
}

func (s *stream) printf(format string, args ...any) {
	if s.err != nil {
		return
	}
	if s.err = s.rc.SetWriteDeadline(time.Now().Add(s.timeout)); s.err != nil {
		return
	}
	_, s.err = fmt.Fprintf(s.w, format, args...)
}

func (s *stream) flush() error {
	if s.err != nil {
		return s.err
	}
	if s.err = s.rc.SetWriteDeadline(time.Now().Add(s.timeout)); s.err != nil {
		return s.err
	}
	s.err = s.rc.Flush()
	return s.err
}

// message writes one event; json.Marshal never emits a raw newline, so the
// data fits one data: line.
func (s *stream) message(event, id string, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		s.err = fmt.Errorf("encode %s: %w", event, err)
		return
	}
	if id != "" {
		s.printf("event: %s\nid: %s\ndata: %s\n\n", event, id, data)
	} else {
		s.printf("event: %s\ndata: %s\n\n", event, data)
	}
}

func (s *stream) snapshot(m *liveview.Model) uint64 {
	snap := m.Snapshot()
	s.message("snapshot", m.EventID(snap.Seq), snap)
	return snap.Seq
}

func (s *stream) changes(m *liveview.Model, changes []liveview.Change) {
	for _, c := range changes {
		s.message("change", m.EventID(c.Seq), c)
	}
}

func (s *stream) status(st liveview.Status) { s.message("status", "", st) }
