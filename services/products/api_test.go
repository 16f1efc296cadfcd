package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The article's walkthrough: create, stock, sell out, discontinue; every
// transition is in the history and reaches the broker with its correlation id.
func TestWalkthrough(t *testing.T) {
	t.Parallel()
	s := start(t)
	obs := s.observe("product.#")

	r := s.do("POST", "/api/products", `{"name":"candy","price":100}`, "X-Request-ID", "walkthrough-1")
	if r.status != http.StatusCreated {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	p := r.product(t)
	if p.State != "created" || p.Version != 1 || p.Inventory != 0 || p.Price != 100 || p.Name != "candy" {
		t.Fatalf("created product: %+v", p)
	}
	if loc := r.header.Get("Location"); loc != "/api/products/"+p.ID {
		t.Fatalf("Location %q", loc)
	}
	if r.header.Get("ETag") != `"1"` || r.header.Get("X-Request-ID") != "walkthrough-1" {
		t.Fatalf("headers: %v", r.header)
	}

	steps := []struct {
		n       int64
		state   string
		stock   int64
		version int64
	}{{5, "in_stock", 5, 2}, {-2, "in_stock", 3, 3}, {-3, "out_of_stock", 0, 4}, {4, "in_stock", 4, 5}}
	for _, st := range steps {
		r := s.adjust(p.ID, st.n)
		got := r.product(t)
		if r.status != http.StatusOK || got.State != st.state || got.Inventory != st.stock || got.Version != st.version {
			t.Fatalf("adjust %d: %d %+v", st.n, r.status, got)
		}
	}
	r = s.do("DELETE", "/api/products/"+p.ID, "")
	if got := r.product(t); r.status != http.StatusOK || got.State != "discontinued" || got.Version != 6 {
		t.Fatalf("discontinue: %d %s", r.status, r.body)
	}
	r = s.do("DELETE", "/api/products/"+p.ID, "")
	if got := r.product(t); r.status != http.StatusOK || got.State != "discontinued" || got.Version != 6 {
		t.Fatalf("discontinue again: %d %s", r.status, r.body)
	}

	r = s.do("GET", "/api/products/"+p.ID, "")
	if got := r.product(t); got.Version != 6 || got.Inventory != 4 || r.header.Get("ETag") != `"6"` || !got.CreatedAt.Equal(p.CreatedAt) {
		t.Fatalf("get: %s %v", r.body, r.header)
	}

	var history []struct {
		Sequence      int64  `json:"sequence"`
		Version       int64  `json:"version"`
		Event         string `json:"event"`
		From          string `json:"from"`
		To            string `json:"to"`
		CorrelationID string `json:"correlation_id"`
	}
	s.do("GET", "/api/products/"+p.ID+"/history", "").json(t, &history)
	want := []string{"create initialized created", "add_inventory created in_stock", "reduce_inventory in_stock in_stock",
		"reduce_inventory in_stock out_of_stock", "add_inventory out_of_stock in_stock", "discontinue in_stock discontinued"}
	if len(history) != len(want) {
		t.Fatalf("history has %d transitions, want %d: %+v", len(history), len(want), history)
	}
	for i, h := range history {
		if got := h.Event + " " + h.From + " " + h.To; got != want[i] || h.Version != int64(i+1) {
			t.Errorf("history[%d] = %q v%d, want %q v%d", i, got, h.Version, want[i], i+1)
		}
		if i > 0 && h.Sequence <= history[i-1].Sequence {
			t.Errorf("sequence not increasing at %d", i)
		}
	}
	if history[0].CorrelationID != "walkthrough-1" {
		t.Errorf("create's correlation id %q", history[0].CorrelationID)
	}

	deliveries := obs.wait(t, len(want))
	for i, d := range deliveries[:len(want)] {
		e := decodeEvent(t, d)
		if d.RoutingKey != "product."+e.Event || e.Version != int64(i+1) || e.EntityID != p.ID {
			t.Errorf("delivery %d: key %s event %+v", i, d.RoutingKey, e)
		}
		if d.MessageId != e.ID || d.ContentType != "application/json" || d.DeliveryMode != 2 {
			t.Errorf("delivery %d properties: id %q type %q mode %d", i, d.MessageId, d.ContentType, d.DeliveryMode)
		}
		if d.Headers["correlation_id"] != e.CorrelationID || d.Headers["schema_version"] != "1" {
			t.Errorf("delivery %d headers: %v", i, d.Headers)
		}
	}
	if c := decodeEvent(t, deliveries[0]).CorrelationID; c != "walkthrough-1" {
		t.Errorf("event correlation id %q, want the request id", c)
	}
}

// A create with initial inventory is two transitions in one transaction.
func TestCreateWithInitialInventory(t *testing.T) {
	t.Parallel()
	s := start(t)
	p := s.create("gum", 50, 7)
	if p.State != "in_stock" || p.Version != 2 || p.Inventory != 7 {
		t.Fatalf("%+v", p)
	}
	conn := s.db(t)
	rows, err := conn.Query(context.Background(), `SELECT version, event, transaction_id::text, attributes->>'inventory' FROM history WHERE entity_id = $1 ORDER BY version`, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		version  int64
		event    string
		xid, inv string
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.version, &x.event, &x.xid, &x.inv)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].event != "create" || got[1].event != "add_inventory" || got[0].inv != "0" || got[1].inv != "7" {
		t.Fatalf("history %+v", got)
	}
	if got[0].xid != got[1].xid {
		t.Fatalf("the two transitions were written by different transactions: %s, %s", got[0].xid, got[1].xid)
	}
	var outbox int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM watermill_outbox`).Scan(&outbox); err != nil {
		t.Fatal(err)
	}
	if outbox != 2 {
		t.Fatalf("outbox has %d rows, want 2", outbox)
	}
}

func (s *system) db(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), s.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// counts returns (products, history rows): what a refused request must not change.
func (s *system) counts(t *testing.T) (int, int) {
	t.Helper()
	var p, h int
	if err := s.db(t).QueryRow(context.Background(), `SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM history)`).Scan(&p, &h); err != nil {
		t.Fatal(err)
	}
	return p, h
}

// Bad input gets a 4xx with problem details and changes nothing.
func TestBadRequests(t *testing.T) {
	t.Parallel()
	s := start(t)
	p := s.create("existing", 10, 3)
	gone := s.create("gone", 10, 0)
	if r := s.do("DELETE", "/api/products/"+gone.ID, ""); r.status != 200 {
		t.Fatalf("discontinue: %d", r.status)
	}
	products, history := s.counts(t)
	id := "/api/products/" + p.ID
	huge := `{"name":"` + strings.Repeat("x", 2<<20) + `"}`
	cases := []struct {
		name, method, path, body string
		header                   []string
		status                   int
		field                    string
	}{
		{"missing name", "POST", "/api/products", `{"price":1}`, nil, 422, "name"},
		{"blank name", "POST", "/api/products", `{"name":"   "}`, nil, 422, "name"},
		{"negative price", "POST", "/api/products", `{"name":"a","price":-1}`, nil, 422, "price"},
		{"negative inventory", "POST", "/api/products", `{"name":"a","initial_inventory":-1}`, nil, 422, "initial_inventory"},
		{"control character", "POST", "/api/products", `{"name":"a\u0000b"}`, nil, 422, "name"},
		{"duplicate name", "POST", "/api/products", `{"name":"existing"}`, nil, 409, ""},
		{"malformed json", "POST", "/api/products", `{"name":`, nil, 422, ""},
		{"wrong type", "POST", "/api/products", `{"name":"a","price":"cheap"}`, nil, 422, "price"},
		{"beyond int64", "POST", "/api/products", `{"name":"a","price":99999999999999999999}`, nil, 422, "price"},
		{"unknown field", "POST", "/api/products", `{"name":"a","colour":"red"}`, nil, 422, ""},
		{"trailing data", "POST", "/api/products", `{"name":"a"} {"name":"b"}`, nil, 422, ""},
		{"not json", "POST", "/api/products", `name=a`, []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, ""},
		{"huge body", "POST", "/api/products", huge, nil, 413, ""},
		{"zero adjustment", "PUT", id, `{"adjust_inventory":0}`, nil, 422, "adjust_inventory"},
		{"zero adjustment beats unknown id", "PUT", "/api/products/01a22440-fe48-7279-8594-ef2e37883a3c", `{"adjust_inventory":0}`, nil, 422, "adjust_inventory"},
		{"missing adjustment", "PUT", id, `{}`, nil, 422, "adjust_inventory"},
		{"id in body", "PUT", id, `{"adjust_inventory":1,"product_id":"x"}`, nil, 422, ""},
		{"unknown id", "PUT", "/api/products/01a22440-fe48-7279-8594-ef2e37883a3c", `{"adjust_inventory":1}`, nil, 404, ""},
		{"bad id", "PUT", "/api/products/not-a-uuid", `{"adjust_inventory":1}`, nil, 404, ""},
		{"stale if-match", "PUT", id, `{"adjust_inventory":1}`, []string{"If-Match", `"1"`}, 412, ""},
		{"discontinued", "PUT", "/api/products/" + gone.ID, `{"adjust_inventory":1}`, nil, 409, ""},
		{"below zero", "PUT", id, `{"adjust_inventory":-4}`, nil, 422, "adjust_inventory"},
		{"overflow", "PUT", id, `{"adjust_inventory":9223372036854775807}`, nil, 422, "adjust_inventory"},
		{"delete unknown", "DELETE", "/api/products/01a22440-fe48-7279-8594-ef2e37883a3c", "", nil, 404, ""},
		{"delete stale if-match", "DELETE", id, "", []string{"If-Match", `"7"`}, 412, ""},
		{"get unknown", "GET", "/api/products/nope", "", nil, 404, ""},
		{"history unknown", "GET", "/api/products/01a22440-fe48-7279-8594-ef2e37883a3c/history", "", nil, 404, ""},
		{"bad limit", "GET", "/api/products?limit=0", "", nil, 422, "limit"},
		{"limit not a number", "GET", "/api/products?limit=ten", "", nil, 422, "limit"},
		{"bad after", "GET", "/api/products?after=zzz", "", nil, 422, "after"},
		{"wrong method", "PATCH", id, `{}`, nil, 405, ""},
		{"unknown route", "GET", "/api/nothing", "", nil, 404, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := s.do(c.method, c.path, c.body, c.header...)
			if r.status != c.status {
				t.Fatalf("status %d, want %d: %s", r.status, c.status, r.body)
			}
			pr := r.problem(t)
			if c.field != "" && pr.Errors[c.field] == "" {
				t.Fatalf("no message for field %q: %s", c.field, r.body)
			}
		})
	}
	if p2, h2 := s.counts(t); p2 != products || h2 != history {
		t.Fatalf("refused requests changed state: products %d→%d, history %d→%d", products, p2, history, h2)
	}
}

// If-Match with the current ETag succeeds.
func TestIfMatch(t *testing.T) {
	t.Parallel()
	s := start(t)
	p := s.create("tea", 300, 1)
	r := s.do("PUT", "/api/products/"+p.ID, `{"adjust_inventory":2}`, "If-Match", `"2"`)
	if r.status != 200 || r.header.Get("ETag") != `"3"` {
		t.Fatalf("%d %s %v", r.status, r.body, r.header)
	}
	if r := s.do("DELETE", "/api/products/"+p.ID, "", "If-Match", `"3"`); r.status != 200 {
		t.Fatalf("%d %s", r.status, r.body)
	}
}

// Commands on one product serialise on its row: no lost update, never below zero.
func TestConcurrentCommandsLoseNothing(t *testing.T) {
	t.Parallel()
	s := start(t)
	p := s.create("coffee", 250, 10)

	var wg sync.WaitGroup
	statuses := make(chan int, 60)
	for i := 0; i < 30; i++ {
		wg.Add(2)
		go func() { defer wg.Done(); statuses <- s.adjust(p.ID, 1).status }()
		go func() { defer wg.Done(); statuses <- s.adjust(p.ID, -2).status }()
	}
	wg.Wait()
	close(statuses)
	counts := map[int]int{}
	for st := range statuses {
		counts[st]++
	}
	if counts[200]+counts[422] != 60 {
		t.Fatalf("statuses %v", counts)
	}
	got := s.do("GET", "/api/products/"+p.ID, "").product(t)
	// Every accepted command is one version; the inventory is the sum of
	// the accepted adjustments and never went below zero (CHECK).
	var versions, sum int64
	err := s.db(t).QueryRow(context.Background(), `
		SELECT count(*), coalesce(sum(CASE WHEN event = 'add_inventory' THEN 1 ELSE -2 END), 0)
		FROM history WHERE entity_id = $1 AND version > 2`, p.ID).Scan(&versions, &sum)
	if err != nil {
		t.Fatal(err)
	}
	if versions != int64(counts[200]) || got.Version != 2+versions || got.Inventory != 10+sum || got.Inventory < 0 {
		t.Fatalf("product %+v after %v; history has %d transitions summing to %d", got, counts, versions, sum)
	}
	if got.Inventory == 0 && got.State != "out_of_stock" || got.Inventory > 0 && got.State != "in_stock" {
		t.Fatalf("state %s with inventory %d", got.State, got.Inventory)
	}
}

func TestPaging(t *testing.T) {
	t.Parallel()
	s := start(t)
	if r := s.do("GET", "/api/products", ""); r.status != 200 || strings.TrimSpace(string(r.body)) != "[]" {
		t.Fatalf("empty list: %d %s", r.status, r.body)
	}
	ids := map[string]bool{}
	for i := 0; i < 5; i++ {
		ids[s.create(fmt.Sprintf("p%d", i), 1, 0).ID] = true
	}
	var seen []string
	path := "/api/products?limit=2"
	for pages := 0; path != ""; pages++ {
		if pages > 5 {
			t.Fatal("paging does not end")
		}
		r := s.do("GET", path, "")
		var page []product
		r.json(t, &page)
		for _, p := range page {
			seen = append(seen, p.ID)
		}
		path = ""
		if link := r.header.Get("Link"); link != "" {
			path = strings.TrimSuffix(strings.TrimPrefix(strings.Split(link, ";")[0], "<"), ">")
		}
	}
	if len(seen) != 5 {
		t.Fatalf("saw %d products, want 5", len(seen))
	}
	for i, id := range seen {
		if !ids[id] || i > 0 && seen[i-1] >= id {
			t.Fatalf("pages not ordered by id or unknown id: %v", seen)
		}
	}
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	s := start(t)
	s.create("metric", 1, 1)
	want := []string{
		`http_requests_total{code="201",method="POST",route="POST /api/products"} 1`,
		"statemill_commands_handler_execution_time_seconds",
		"statemill_outbox_pending",
		`statemill_product_transitions_total{event="create",from="initialized",to="created"}`,
	}
	// The command bus records a handler's time once the handler returns,
	// which is after its reply reached the HTTP handler: poll.
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		body := string(s.do("GET", "/metrics", "").body)
		var missing []string
		for _, w := range want {
			if !strings.Contains(body, w) {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 {
			return
		}
		select {
		case <-deadline:
			t.Fatalf("after 10s, metrics lack %q", missing)
		case <-tick.C:
		}
	}
}
