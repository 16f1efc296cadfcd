package main

import (
	"net/http"
	"strings"
	"sync"
	"testing"
)

// A client that retries with the same Idempotency-Key gets the first outcome;
// nothing fires twice.
func TestIdempotencyKey(t *testing.T) {
	t.Parallel()
	s := start(t)

	first := s.do("POST", "/api/products", `{"name":"retry","price":5}`, "Idempotency-Key", "create-1")
	again := s.do("POST", "/api/products", `{"name":"retry","price":5}`, "Idempotency-Key", "create-1")
	if first.status != http.StatusCreated || again.status != http.StatusCreated {
		t.Fatalf("create: %d then %d (%s)", first.status, again.status, again.body)
	}
	p := first.product(t)
	if again.product(t) != p {
		t.Fatalf("retried create answered %s, first %s", again.body, first.body)
	}

	// Ten concurrent retries of one adjustment: one adjustment.
	var wg sync.WaitGroup
	bodies := make([]string, 10)
	statuses := make([]int, 10)
	for i := range bodies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := s.do("PUT", "/api/products/"+p.ID, `{"adjust_inventory":3}`, "Idempotency-Key", "adjust-1")
			statuses[i], bodies[i] = r.status, string(r.body)
		}()
	}
	wg.Wait()
	for i := range bodies {
		if statuses[i] != http.StatusOK || bodies[i] != bodies[0] {
			t.Fatalf("retry %d: %d %s; first %s", i, statuses[i], bodies[i], bodies[0])
		}
	}
	got := s.do("GET", "/api/products/"+p.ID, "").product(t)
	if got.Inventory != 3 || got.Version != 2 {
		t.Fatalf("after ten retries of +3: %+v", got)
	}

	// The same key for another request is refused, and changes nothing.
	r := s.do("PUT", "/api/products/"+p.ID, `{"adjust_inventory":4}`, "Idempotency-Key", "adjust-1")
	if r.status != http.StatusUnprocessableEntity || r.problem(t).Errors["Idempotency-Key"] == "" {
		t.Fatalf("key reused for another body: %d %s", r.status, r.body)
	}
	r = s.do("DELETE", "/api/products/"+p.ID, "", "Idempotency-Key", "adjust-1")
	if r.status != http.StatusUnprocessableEntity {
		t.Fatalf("key reused for another method: %d %s", r.status, r.body)
	}

	// A retried discontinue after a later change still answers its own outcome.
	d1 := s.do("DELETE", "/api/products/"+p.ID, "", "Idempotency-Key", "stop-1")
	d2 := s.do("DELETE", "/api/products/"+p.ID, "", "Idempotency-Key", "stop-1")
	if d1.status != 200 || string(d1.body) != string(d2.body) {
		t.Fatalf("discontinue retried: %d %s / %s", d1.status, d1.body, d2.body)
	}

	var history int
	if err := s.db(t).QueryRow(t.Context(), `SELECT count(*) FROM history WHERE entity_id = $1`, p.ID).Scan(&history); err != nil {
		t.Fatal(err)
	}
	if history != 3 {
		t.Fatalf("history has %d transitions, want 3 (create, add_inventory, discontinue)", history)
	}

	for _, bad := range []string{strings.Repeat("k", 256), "two words", "ünïcode"} {
		if r := s.do("POST", "/api/products", `{"name":"x"}`, "Idempotency-Key", bad); r.status != http.StatusUnprocessableEntity {
			t.Fatalf("key %q: %d %s", bad, r.status, r.body)
		}
	}
}
