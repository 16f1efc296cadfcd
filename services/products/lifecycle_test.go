package main

import (
	"context"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/sandbox"
)

// With PostgreSQL unreachable, commands answer 503 quickly (never hang) and
// the service recovers by itself when the database is back.
func TestDatabaseDownAnswers503(t *testing.T) {
	t.Parallel()
	dbURL := sandbox.Postgres(t)
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := sandbox.NewProxy(t, u.Host)
	u.Host = proxy.Addr()
	s := start(t, func(o *options) { o.databaseURL = u.String() })
	p := s.create("soup", 120, 1)

	proxy.Down()
	client := &http.Client{Timeout: 10 * time.Second} // a hang fails the request, and so the test
	for _, c := range []struct{ method, path, body string }{
		{"PUT", "/api/products/" + p.ID, `{"adjust_inventory":1}`},
		{"POST", "/api/products", `{"name":"bread"}`},
		{"DELETE", "/api/products/" + p.ID, ""},
		{"GET", "/api/products/" + p.ID, ""},
	} {
		req, _ := http.NewRequest(c.method, s.base+c.path, stringsReader(c.body))
		req.Header.Set("Content-Type", "application/json")
		began := time.Now()
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusServiceUnavailable || res.Header.Get("Content-Type") != "application/problem+json" {
			t.Fatalf("%s %s while PostgreSQL is down: %d %s", c.method, c.path, res.StatusCode, res.Header.Get("Content-Type"))
		}
		t.Logf("%s %s → 503 in %s", c.method, c.path, time.Since(began).Round(time.Millisecond))
	}
	if r := s.do("GET", "/healthz", ""); r.status != http.StatusServiceUnavailable {
		t.Fatalf("healthz while PostgreSQL is down: %d %s", r.status, r.body)
	}

	proxy.Up()
	eventually(t, 15*time.Second, "commands succeed again", func() bool { return s.adjust(p.ID, 1).status == http.StatusOK })
	if got := s.do("GET", "/api/products/"+p.ID, "").product(t); got.Inventory != 2 || got.Version != 3 {
		t.Fatalf("after recovery: %+v (the commands refused with 503 must not have applied)", got)
	}
}

// Stopping the service (SIGTERM) lets in-flight commands finish and flushes
// the outbox: every acknowledged command's event reaches the broker.
func TestGracefulShutdownFlushesTheOutbox(t *testing.T) {
	t.Parallel()
	s := start(t)
	obs := s.observe("product.#")
	products := make([]product, 4)
	for i := range products {
		products[i] = s.create("stock"+string(rune('a'+i)), 1, 0)
	}

	var (
		mu       sync.Mutex
		accepted int
		wg       sync.WaitGroup
	)
	client := &http.Client{Timeout: 20 * time.Second}
	stopping := make(chan struct{})
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(p product) {
			defer wg.Done()
			for {
				select {
				case <-stopping:
					return
				default:
				}
				req, _ := http.NewRequest("PUT", s.base+"/api/products/"+p.ID, stringsReader(`{"adjust_inventory":1}`))
				req.Header.Set("Content-Type", "application/json")
				res, err := client.Do(req)
				if err != nil {
					return // the server closed: intake stopped
				}
				res.Body.Close()
				if res.StatusCode == http.StatusOK {
					mu.Lock()
					accepted++
					mu.Unlock()
				}
			}
		}(products[i%len(products)])
	}
	eventually(t, 20*time.Second, "some commands accepted", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return accepted >= 40
	})
	if err := s.shutdown(); err != nil {
		t.Fatalf("Run after shutdown: %v", err)
	}
	close(stopping)
	wg.Wait()

	var history, pending int
	err := s.db(t).QueryRow(context.Background(), `
		SELECT (SELECT count(*) FROM history),
		       (SELECT count(*) FROM watermill_outbox o, watermill_offsets_outbox f
		        WHERE (o.transaction_id, o."offset") > (f.last_processed_transaction_id, f.offset_acked))`).Scan(&history, &pending)
	if err != nil {
		t.Fatal(err)
	}
	if history != len(products)+accepted {
		t.Fatalf("history has %d rows; %d creates and %d accepted adjustments", history, len(products), accepted)
	}
	if pending != 0 {
		t.Fatalf("%d outbox rows left unpublished after a clean stop", pending)
	}
	if got := len(obs.wait(t, history)); got < history {
		t.Fatalf("broker got %d events, want %d", got, history)
	}
}
