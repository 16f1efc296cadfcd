package web

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func newRegistry() *prometheus.Registry { return prometheus.NewRegistry() }

func testRouter() *Router {
	rt := NewRouter()
	rt.HandleFunc("GET /api/things/{id}", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusOK, map[string]string{"id": r.PathValue("id")})
	})
	rt.HandleFunc("DELETE /api/things/{id}", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	rt.Handle("GET /dir/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	return rt
}

func TestRouterMatches(t *testing.T) {
	rec := httptest.NewRecorder()
	testRouter().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/things/7", nil))
	if rec.Code != 200 || rec.Body.String() != `{"id":"7"}`+"\n" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

func TestRouterNotFoundProblem(t *testing.T) {
	rec := httptest.NewRecorder()
	testRouter().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/nothing", nil))
	if rec.Code != 404 {
		t.Fatalf("status %d", rec.Code)
	}
	if p := decodeProblem(t, rec); p.Type != ProblemTypeBase+"not_found" || p.Instance != "/api/nothing" {
		t.Errorf("%+v", p)
	}
}

func TestRouterMethodNotAllowedProblem(t *testing.T) {
	rec := httptest.NewRecorder()
	testRouter().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/api/things/7", nil))
	if rec.Code != 405 {
		t.Fatalf("status %d", rec.Code)
	}
	if allow := rec.Header().Get("Allow"); allow != "DELETE, GET, HEAD" {
		t.Errorf("Allow = %q", allow)
	}
	if p := decodeProblem(t, rec); p.Type != ProblemTypeBase+"method_not_allowed" || p.Title != "Method Not Allowed" {
		t.Errorf("%+v", p)
	}
}

func TestRouterRedirectsPassThrough(t *testing.T) {
	rt := testRouter()
	for path, loc := range map[string]string{
		"/dir":           "/dir/",         // trailing-slash redirect to a pattern
		"/api//things/7": "/api/things/7", // cleaned path that matches
		"/api//nothing":  "/api/nothing",  // cleaned path that will 404: no pattern
	} {
		rec := httptest.NewRecorder()
		rt.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != http.StatusTemporaryRedirect || rec.Header().Get("Location") != loc {
			t.Errorf("%s: %d %v", path, rec.Code, rec.Header())
		}
	}
}

// counter returns http_requests_total for the given labels (0 if absent).
func counter(t *testing.T, reg *prometheus.Registry, method, route, code string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "http_requests_total" {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			want := map[string]string{"method": method, "route": route, "code": code}
			for _, l := range m.GetLabel() {
				if want[l.GetName()] != l.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

func histogramCount(t *testing.T, reg *prometheus.Registry, method, route string) uint64 {
	t.Helper()
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() != "http_request_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["method"] == method && labels["route"] == route {
				return m.GetHistogram().GetSampleCount()
			}
		}
	}
	return 0
}

// An extra middleware that copies the request (as RequestID and many others
// do) sits between Metrics and the router: the pattern must still arrive.
func copyRequest(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), struct{}{}, 1)))
	})
}

func TestMetricsLabelledByPattern(t *testing.T) {
	reg := newRegistry()
	m, err := NewHTTPMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	captureLogs(t)
	h := Chain(testRouter(), RequestID, Log, m.Middleware, copyRequest, Recover)
	do := func(method, path string) {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(method, path, nil))
	}
	do("GET", "/api/things/1")
	do("GET", "/api/things/2")
	do("DELETE", "/api/things/3")
	do("POST", "/api/things/3")
	do("GET", "/no/such/path")
	do("BREW", "/api/things/1")

	for _, c := range []struct {
		method, route, code string
		want                float64
	}{
		{"GET", "GET /api/things/{id}", "200", 2},
		{"DELETE", "DELETE /api/things/{id}", "204", 1},
		{"POST", "unmatched", "405", 1},
		{"GET", "unmatched", "404", 1},
		{"OTHER", "unmatched", "405", 1},
	} {
		if got := counter(t, reg, c.method, c.route, c.code); got != c.want {
			t.Errorf("http_requests_total{%s,%s,%s} = %v, want %v", c.method, c.route, c.code, got, c.want)
		}
	}
	if n := histogramCount(t, reg, "GET", "GET /api/things/{id}"); n != 2 {
		t.Errorf("histogram count %d", n)
	}
}

func TestMetricsBareServeMux(t *testing.T) {
	reg := newRegistry()
	m, _ := NewHTTPMetrics(reg)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /x/{id}", func(http.ResponseWriter, *http.Request) {})
	m.Middleware(mux).ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/x/1", nil))
	if got := counter(t, reg, "GET", "GET /x/{id}", "200"); got != 1 {
		t.Errorf("count %v", got)
	}
}

func TestMetricsPanicCounted(t *testing.T) {
	reg := newRegistry()
	m, _ := NewHTTPMetrics(reg)
	captureLogs(t)
	rt := NewRouter()
	rt.HandleFunc("GET /boom", func(http.ResponseWriter, *http.Request) { panic("x") })
	Chain(rt, m.Middleware, Recover).ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/boom", nil))
	if got := counter(t, reg, "GET", "GET /boom", "500"); got != 1 {
		t.Errorf("count %v", got)
	}
}

func TestNewHTTPMetricsTwiceSharesCollectors(t *testing.T) {
	reg := newRegistry()
	a, err := NewHTTPMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewHTTPMetrics(reg)
	if err != nil {
		t.Fatalf("second registration: %v", err)
	}
	if a.requests != b.requests || a.duration != b.duration {
		t.Error("collectors not shared")
	}
}
