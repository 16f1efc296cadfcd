package web

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/uuid"
)

func TestRequestID(t *testing.T) {
	var seen string
	h := RequestID(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = RequestIDFrom(r.Context())
	}))
	tests := []struct {
		name, in string
		keep     bool
	}{
		{"echo", "abc-123_XYZ.~:/", true},
		{"max length", strings.Repeat("a", 128), true},
		{"missing", "", false},
		{"too long", strings.Repeat("a", 129), false},
		{"space", "a b", false},
		{"control", "a\tb", false},
		{"newline forging a log line", "a\nlevel=ERROR", false},
		{"non-ascii", "ид", false},
		{"DEL", "a\x7f", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "/", nil)
			if tc.in != "" {
				r.Header.Set(RequestIDHeader, tc.in)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			got := rec.Header().Get(RequestIDHeader)
			if got != seen {
				t.Fatalf("header %q != context %q", got, seen)
			}
			if tc.keep {
				if got != tc.in {
					t.Fatalf("got %q, want echo of %q", got, tc.in)
				}
				return
			}
			id, err := uuid.Parse(got)
			if err != nil || id.Version() != 7 {
				t.Fatalf("got %q, want a fresh UUIDv7", got)
			}
		})
	}
	if RequestIDFrom(t.Context()) != "" {
		t.Error("empty context has an id")
	}
}

func TestRecover(t *testing.T) {
	logs := captureLogs(t)
	h := Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		panic("boom: secret detail")
	}), RequestID, Recover)
	r := httptest.NewRequest(http.MethodGet, "/p", nil)
	r.Header.Set(RequestIDHeader, "rid-panic")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	if rec.Code != 500 || strings.Contains(rec.Body.String(), "secret") {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if p := decodeProblem(t, rec); p.RequestID != "rid-panic" {
		t.Errorf("problem %+v", p)
	}
	out := logs.String()
	for _, want := range []string{"boom: secret detail", "rid-panic", "middleware_test.go"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestRecoverAfterHeaderAbortsConnection(t *testing.T) {
	logs := captureLogs(t)
	h := Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "partial")
		panic("late boom")
	}), Log, Recover)
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = nil
	srv.Start()
	defer srv.Close()
	// Either the reply never arrives or its body breaks off: never a
	// complete-looking 200.
	resp, err := http.Get(srv.URL)
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("a reply cut short by a panic read as complete")
	}
	if !strings.Contains(logs.String(), "late boom") {
		t.Errorf("panic not logged:\n%s", logs)
	}
}

func TestRecoverLetsAbortHandlerThrough(t *testing.T) {
	h := Recover(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) }))
	defer func() {
		if p := recover(); p != http.ErrAbortHandler {
			t.Fatalf("recovered %v", p)
		}
	}()
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
}

func TestLog(t *testing.T) {
	logs := captureLogs(t)
	rt := NewRouter()
	rt.HandleFunc("GET /things/{id}", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusTeapot, r.PathValue("id"))
	})
	h := Chain(rt, RequestID, Log, Recover)
	r := httptest.NewRequest(http.MethodGet, "/things/42", nil)
	r.Header.Set(RequestIDHeader, "rid-log")
	h.ServeHTTP(httptest.NewRecorder(), r)
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/nowhere", nil))

	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatal(err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 2 {
		t.Fatalf("want 2 lines:\n%s", logs)
	}
	first := lines[0]
	if first["method"] != "GET" || first["route"] != "GET /things/{id}" || first["status"] != float64(418) ||
		first["request_id"] != "rid-log" || first["path"] != "/things/42" || first["duration"] == nil {
		t.Errorf("line %v", first)
	}
	if lines[1]["route"] != "unmatched" || lines[1]["status"] != float64(404) {
		t.Errorf("line %v", lines[1])
	}
}

// Server-sent events need Flush through the wrappers.
func TestWrappersKeepFlush(t *testing.T) {
	m, _ := NewHTTPMetrics(newRegistry())
	var flushed bool
	h := Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, ok := w.(http.Flusher)
		if !ok {
			t.Fatal("no http.Flusher")
		}
		f.Flush()
		flushed = http.NewResponseController(w).Flush() == nil
	}), RequestID, Log, m.Middleware, Recover)
	captureLogs(t)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	if !flushed || !rec.Flushed {
		t.Fatal("flush did not reach the recorder")
	}
}
