package web

import (
	"bytes"
	"net/http"

	"github.com/statemill/statemill/infra/apperr"
)

// Router is an http.ServeMux (Go 1.22 patterns such as
// "GET /api/things/{id}") whose own 404 and 405 replies are problem details
// like every other error, with the Allow header kept on 405. It also tells
// Log and Metrics which pattern matched.
type Router struct {
	mux *http.ServeMux
}

// NewRouter returns an empty Router.
func NewRouter() *Router { return &Router{mux: http.NewServeMux()} }

// Handle registers h for pattern; like ServeMux it panics on a bad or
// conflicting pattern, which is a bug found at start-up.
func (rt *Router) Handle(pattern string, h http.Handler) { rt.mux.Handle(pattern, h) }

// HandleFunc registers f for pattern.
func (rt *Router) HandleFunc(pattern string, f func(http.ResponseWriter, *http.Request)) {
	rt.mux.HandleFunc(pattern, f)
}

// ServeHTTP dispatches r. When no pattern matches, ServeMux's plain-text
// 404/405 is captured and rewritten as a problem; its other internal replies
// (redirects to a cleaned path or to a trailing slash) pass through as they
// are.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.RequestURI == "*" { // "OPTIONS *": ServeMux answers it itself
		rt.mux.ServeHTTP(w, r)
		return
	}
	h, pattern := rt.mux.Handler(r)
	if pattern != "" {
		setRoute(r, pattern)
		rt.mux.ServeHTTP(w, r) // matches again, and sets r.Pattern and path values
		return
	}
	rec := &capture{header: http.Header{}}
	h.ServeHTTP(rec, r)
	switch rec.status {
	case http.StatusNotFound:
		writeProblem(w, r, http.StatusNotFound, string(apperr.NotFound), "no resource matches this path", nil)
	case http.StatusMethodNotAllowed:
		w.Header().Set("Allow", rec.header.Get("Allow"))
		writeProblem(w, r, http.StatusMethodNotAllowed, "method_not_allowed",
			"method "+r.Method+" is not allowed here; see the Allow header", nil)
	default:
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.status)
		_, _ = w.Write(rec.body.Bytes())
	}
}

// capture is the smallest ResponseWriter that lets Router look at what
// ServeMux would have answered for an unmatched request (a few bytes).
type capture struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (c *capture) Header() http.Header { return c.header }

func (c *capture) WriteHeader(code int) {
	if c.status == 0 {
		c.status = code
	}
}

func (c *capture) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	return c.body.Write(p)
}
