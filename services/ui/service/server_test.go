package service

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/liveview"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// served is the ui's HTTP side over a model the test feeds directly, on a
// server with the given timeouts (no broker involved).
type served struct {
	api   *api
	model *liveview.Model
	srv   *http.Server
	base  string
}

func serve(t *testing.T, products string, timeouts time.Duration, edit func(*Config)) *served {
	t.Helper()
	model, err := liveview.New(liveview.Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{ProductsURL: products, Logger: quiet}
	if edit != nil {
		edit(&cfg)
	}
	cfg.setDefaults()
	u, err := url.Parse(cfg.ProductsURL)
	if err != nil {
		t.Fatal(err)
	}
	a, err := newAPI(model, u, cfg)
	if err != nil {
		t.Fatal(err)
	}
	router := web.NewRouter()
	a.routes(router, securityHeaders)
	// The middleware of Run: the stream must work through its wrappers.
	srv := &http.Server{
		Handler:     web.Chain(router, web.RequestID, web.Recover),
		ReadTimeout: timeouts, WriteTimeout: timeouts, ReadHeaderTimeout: timeouts, IdleTimeout: timeouts,
	}
	srv.RegisterOnShutdown(a.stopStreams)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	model.SetStatus(liveview.Status{Connected: true})
	return &served{api: a, model: model, srv: srv, base: "http://" + ln.Addr().String()}
}

var start = time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC)

// productEvent is version v of product id, with inventory v.
func productEvent(id string, v int64, name string) envelope.Event {
	attrs, _ := json.Marshal(events.ProductAttributes{ID: id, Name: name, Price: 100, Inventory: v, State: events.InStock})
	from, ev := events.InStock, events.AddInventory
	if v == 1 {
		from, ev = events.Initialized, events.Create
	}
	return envelope.Event{
		ID: fmt.Sprintf("%s-%d", id, v), SchemaVersion: 1, EntityType: events.EntityType, EntityID: id, Version: v,
		Event: ev, From: from, To: events.InStock, Attributes: attrs, OccurredAt: start.Add(time.Duration(v) * time.Second),
	}
}

// The server's read and write timeouts do not cut an event stream: it
// outlives them several times over, with every change and heartbeats.
func TestStreamOutlivesServerTimeouts(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	s := serve(t, "http://127.0.0.1:1", timeout, func(c *Config) { c.Heartbeat = 50 * time.Millisecond })
	c := openSSE(t, s.base+"/ui/events", "")
	c.snapshot()
	began := time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	v := int64(0)
	for time.Since(began) < 5*timeout {
		<-tick.C
		v++
		s.model.Apply([]envelope.Event{productEvent("p1", v, "pear")})
		if _, ch := c.change(); ch.Product.Version != v {
			t.Fatalf("change for version %d: %+v", v, ch)
		}
	}
	if c.commentCount() == 0 {
		t.Fatal("no heartbeat comments")
	}
	if c.waitEnded(0) {
		t.Fatal("the stream ended")
	}
}

// Shutting the server down ends open streams (instead of waiting for them)
// and refuses new ones.
func TestShutdownEndsStreams(t *testing.T) {
	t.Parallel()
	s := serve(t, "http://127.0.0.1:1", time.Minute, nil)
	c := openSSE(t, s.base+"/ui/events", "")
	c.snapshot()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	began := time.Now()
	if err := s.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with an open stream: %v after %s", err, time.Since(began))
	}
	if !c.waitEnded(5 * time.Second) {
		t.Fatal("the stream outlived the shutdown")
	}
	rec := httptest.NewRecorder()
	s.api.events(rec, httptest.NewRequest("GET", "/ui/events", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("a stream after the shutdown: %d", rec.Code)
	}
}

// A browser that stops reading never holds up the others: the fast one
// keeps up (or resyncs by snapshot), and the stuck one is dropped once a
// write to it times out.
func TestSlowStreamIsDropped(t *testing.T) {
	t.Parallel()
	s := serve(t, "http://127.0.0.1:1", time.Minute, nil)
	s.api.writeTimeout = 500 * time.Millisecond

	// The slow client: a raw connection that sends a request and never reads.
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := fmt.Fprintf(conn, "GET /ui/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	fast := openSSE(t, s.base+"/ui/events", "")
	fast.snapshot()
	eventually(t, waitFor, "two streams", func() string {
		if n := s.model.Watchers(); n != 2 {
			return fmt.Sprintf("%d", n)
		}
		return ""
	})

	// Megabytes of changes: far more than the socket buffers hold.
	name := strings.Repeat("x", 4000)
	const n = 3000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for v := int64(1); v <= n; v++ {
			s.model.Apply([]envelope.Event{productEvent("p1", v, name)})
		}
	}()
	select {
	case <-done:
	case <-time.After(waitFor):
		t.Fatal("applying changes blocked behind a stream")
	}
	// The fast client reaches the last version.
	deadline := time.Now().Add(waitFor)
	for seen := int64(0); seen < n; {
		if time.Now().After(deadline) {
			t.Fatalf("the fast client saw version %d of %d", seen, n)
		}
		switch ev := fast.next(); ev.Event {
		case "change":
			var ch liveview.Change
			if err := json.Unmarshal([]byte(ev.Data), &ch); err != nil {
				t.Fatal(err)
			}
			seen = ch.Product.Version
		case "snapshot":
			var sn liveview.Snapshot
			if err := json.Unmarshal([]byte(ev.Data), &sn); err != nil {
				t.Fatal(err)
			}
			if len(sn.Products) == 1 {
				seen = sn.Products[0].Version
			}
		}
	}
	eventually(t, waitFor, "the slow stream dropped", func() string {
		if n := s.model.Watchers(); n != 1 {
			return fmt.Sprintf("%d streams", n)
		}
		return ""
	})
}

// The history proxy answers 404 for an unknown product and 503, quickly,
// whenever the products service fails; the browser never sees its errors
// raw.
func TestHistoryProxyFailures(t *testing.T) {
	t.Parallel()
	const id = "0198f0c2-7d1e-7000-8000-000000000001"
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	requestIDs := make(chan string, 16)
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case requestIDs <- r.Header.Get(web.RequestIDHeader):
		default:
		}
		switch {
		case r.URL.Path != "/api/products/"+id+"/history":
			http.NotFound(w, r)
		case r.Header.Get("Accept") != "application/json":
			http.Error(w, "accept", http.StatusNotAcceptable)
		default:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `[{"id":"e1","version":1,"event":"create","from":"initialized","to":"created","entity_attributes":{"inventory":0,"price":5}}]`)
		}
	}))
	t.Cleanup(fake.Close)
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.Contains(r.URL.Path, "0000000000aa"):
			http.Error(w, "boom", http.StatusInternalServerError)
		case strings.Contains(r.URL.Path, "0000000000bb"):
			_, _ = io.WriteString(w, "{not json")
		default:
			select { // slower than the timeout
			case <-gate:
			case <-r.Context().Done():
			}
		}
	}))
	t.Cleanup(broken.Close)
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()

	ok := serve(t, fake.URL, time.Minute, nil)
	bad := serve(t, broken.URL, time.Minute, func(c *Config) { c.HistoryTimeout = 200 * time.Millisecond })
	down := serve(t, closed.URL, time.Minute, nil)

	var got []map[string]any
	req, _ := http.NewRequest("GET", ok.base+"/ui/products/"+id+"/history", nil)
	req.Header.Set(web.RequestIDHeader, "trace-me")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.NewDecoder(res.Body).Decode(&got); err != nil || res.StatusCode != http.StatusOK || len(got) != 1 || got[0]["event"] != "create" {
		t.Fatalf("proxied history: %d %v %v", res.StatusCode, got, err)
	}
	res.Body.Close()
	if got := <-requestIDs; got != "trace-me" {
		t.Errorf("the request id did not travel to the products service: %q", got)
	}
	for _, c := range []struct {
		base, id string
		want     int
	}{
		{ok.base, "0198f0c2-7d1e-7000-8000-000000000002", http.StatusNotFound},
		{ok.base, "nope", http.StatusNotFound},
		{bad.base, "0198f0c2-7d1e-7000-8000-0000000000aa", http.StatusServiceUnavailable},
		{bad.base, "0198f0c2-7d1e-7000-8000-0000000000bb", http.StatusServiceUnavailable},
		{bad.base, "0198f0c2-7d1e-7000-8000-0000000000cc", http.StatusServiceUnavailable}, // slow
		{down.base, id, http.StatusServiceUnavailable},
	} {
		began := time.Now()
		res, err := http.Get(c.base + "/ui/products/" + c.id + "/history")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != c.want || res.Header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("history of %s via %s: %d %s %s, want %d", c.id, c.base, res.StatusCode, res.Header.Get("Content-Type"), body, c.want)
		}
		if took := time.Since(began); took > 3*time.Second {
			t.Errorf("history of %s took %s", c.id, took)
		}
	}
}

func TestConfigFromEnv(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	cfg, err := ConfigFromEnv(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HTTPAddr != ":8082" || cfg.ProductsURL != "http://localhost:8080" || cfg.AMQPURL == "" ||
		cfg.Topology.EventsExchange != "events" || cfg.Topology.CommandsExchange != "commands" || cfg.Heartbeat <= 0 {
		t.Fatalf("defaults: %+v", cfg)
	}
	cfg, err = ConfigFromEnv(env(map[string]string{"HTTP_ADDR": ":9", "PRODUCTS_URL": "http://products:8080", "EVENTS_EXCHANGE": "e", "COMMANDS_EXCHANGE": "c"}))
	if err != nil || cfg.HTTPAddr != ":9" || cfg.ProductsURL != "http://products:8080" || cfg.Topology.EventsExchange != "e" || cfg.Topology.CommandsExchange != "c" {
		t.Fatalf("from env: %+v %v", cfg, err)
	}
	for _, bad := range []map[string]string{
		{"PRODUCTS_URL": "products:8080"},
		{"PRODUCTS_URL": "ftp://products"},
		{"LOG_LEVEL": "loud"},
	} {
		if _, err := ConfigFromEnv(env(bad)); err == nil {
			t.Errorf("ConfigFromEnv(%v) accepted it", bad)
		}
	}
	// Run refuses what the view refuses, without starting anything.
	err = Run(context.Background(), Config{Prefix: "Not A Prefix", Logger: quiet})
	if err == nil || !strings.Contains(err.Error(), "prefix") {
		t.Fatalf("Run with a bad prefix: %v", err)
	}
}
