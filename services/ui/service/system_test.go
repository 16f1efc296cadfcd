package service

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/projections/liveview"
)

// metric reads one sample of the ui's /metrics.
func metric(t *testing.T, base, name string) float64 {
	t.Helper()
	res, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no metric %s in:\n%s", name, b)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A ui started after the products exist shows them: rebuilt by a latest
// replay, which sends one event per product, not the whole history.
func TestUIStartedLaterIsRebuiltByReplay(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	early := e.startUI() // sees everything live
	a := e.create("anise", 100, 0)
	b := e.create("basil", 200, 5)
	e.adjust(b.ID, -5)
	e.adjust(b.ID, 2)
	c := e.create("cumin", 300, 1)
	c = e.discontinue(c.ID)
	want := map[string]product{a.ID: a, c.ID: c}
	var list []product
	if code := call(t, "GET", e.products+"/api/products", "", &list); code != http.StatusOK || len(list) != 3 {
		t.Fatalf("products: %d %+v", code, list)
	}
	for _, p := range list {
		want[p.ID] = p
	}
	transitions := 0
	for _, p := range want {
		transitions += int(p.Version)
	}
	early.waitProduct(t, b.ID, want[b.ID].Version)
	early.waitProduct(t, c.ID, want[c.ID].Version)

	late := e.startUI() // healthy only once its replay is complete
	l := late.listing(t)
	if !l.Status.Connected || l.Status.Replaying {
		t.Fatalf("a healthy ui reports %+v", l.Status)
	}
	if len(l.Products) != len(want) {
		t.Fatalf("the late ui shows %d products, want %d: %+v", len(l.Products), len(want), l.Products)
	}
	for _, got := range l.Products {
		w := want[got.ID]
		if got.Name != w.Name || got.Price != w.Price || got.Inventory != w.Inventory || got.State != w.State || got.Version != w.Version {
			t.Errorf("late ui: %+v, want %+v", got, w)
		}
	}
	if l.Counts[events.InStock] != 1 || l.Counts[events.Created] != 1 || l.Counts[events.Discontinued] != 1 {
		t.Errorf("counts %v", l.Counts)
	}
	// Both instances agree.
	if fmt.Sprint(late.listing(t).Products) != fmt.Sprint(early.listing(t).Products) {
		t.Errorf("the instances differ:\n late  %+v\n early %+v", late.listing(t).Products, early.listing(t).Products)
	}
	// O(products): the replay brought the newest transition of each.
	if got := metric(t, late.base, "statemill_ui_events_applied_total"); got != float64(len(want)) {
		t.Errorf("the late ui applied %v events for %d products (%d transitions in all); want one per product", got, len(want), transitions)
	}
	if got := metric(t, late.base, "statemill_ui_replays_total"); got != 1 {
		t.Errorf("replays_total = %v", got)
	}
	// A fresh page of the late ui starts from the same state.
	s := openSSE(t, late.base+"/ui/events", "")
	_, snap := s.snapshot()
	if len(snap.Products) != 3 || snap.Epoch == "" {
		t.Fatalf("snapshot %+v", snap)
	}
	if st := s.nextStatus(); !st.Connected || st.Replaying {
		t.Fatalf("status after the snapshot: %+v", st)
	}

	// And it follows live changes from then on.
	d := e.adjust(a.ID, 3)
	late.waitProduct(t, a.ID, d.Version)
	_, ch := s.change()
	if ch.Product.ID != a.ID || ch.Product.State != events.InStock || ch.Event != events.AddInventory || ch.Product.Inventory != 3 {
		t.Fatalf("change %+v", ch)
	}

	// Each instance has its own queue; a stopped one's queue expires.
	if early.prefix == late.prefix {
		t.Fatal("two instances share a prefix")
	}
}

// 50 browsers on one instance all get a change (one queue, fanned out in
// process); a browser that reconnects with Last-Event-ID gets exactly what it
// missed, and one with an unknown id gets a fresh snapshot.
func TestSSEFanOutAndResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.startUI()
	p := e.create("pretzel", 150, 0)
	u.waitProduct(t, p.ID, 1)

	// Fifty browsers, all connected at once. Each stream is read by a
	// goroutine of its own (the client), so reading them one after the
	// other below waits for none.
	const n = 50
	clients := make([]*sseClient, n)
	for i := range clients {
		clients[i] = openSSE(t, u.base+"/ui/events", "")
	}
	seqs := map[string]bool{}
	for i, c := range clients {
		ev, snap := c.snapshot()
		if len(snap.Products) != 1 || snap.Products[0].ID != p.ID {
			t.Fatalf("client %d: snapshot %+v", i, snap)
		}
		seqs[ev.ID] = true
		if c.retryField() == "" {
			t.Fatalf("client %d: no retry: field", i)
		}
	}
	if len(seqs) != 1 {
		t.Fatalf("the snapshots are at different points: %v", seqs)
	}
	eventually(t, waitFor, "50 streams counted", func() string {
		if got := metric(t, u.base, "statemill_ui_streams"); got != n {
			return fmt.Sprintf("%v streams", got)
		}
		return ""
	})

	changed := e.adjust(p.ID, 4)
	ids := map[string]bool{}
	for i, c := range clients {
		ev, ch := c.change()
		ids[ev.ID] = true
		if ch.Product.ID != p.ID || ch.Product.Version != changed.Version || ch.Product.Inventory != 4 || ch.To != events.InStock {
			t.Fatalf("client %d got %+v", i, ch)
		}
	}
	if len(ids) != 1 {
		t.Fatalf("the clients got the change under different ids: %v", ids)
	}
	for _, c := range clients[1:] {
		c.close()
	}

	// Resume: the first client goes away after the change, misses three,
	// and comes back with its last id.
	r := clients[0]
	var last string
	for id := range ids {
		last = id
	}
	r.close()
	var missed []int64
	for _, d := range []int64{1, 1, -2} {
		missed = append(missed, e.adjust(p.ID, d).Version)
	}
	u.waitProduct(t, p.ID, missed[2])
	back := openSSE(t, u.base+"/ui/events", last)
	epoch, seqText, _ := strings.Cut(last, "-")
	seq, _ := strconv.ParseUint(seqText, 10, 64)
	for i, v := range missed {
		ev, ch := back.change()
		if want := fmt.Sprintf("%s-%d", epoch, seq+uint64(i)+1); ev.ID != want || ch.Product.Version != v {
			t.Fatalf("resumed event %d: id %s version %d, want id %s version %d", i, ev.ID, ch.Product.Version, want, v)
		}
	}
	// Nothing else was queued for it: the next event is the next change.
	sentinel := e.create("sentinel", 1, 0)
	ev, ch := back.change()
	if want := fmt.Sprintf("%s-%d", epoch, seq+4); ev.ID != want || ch.Product.ID != sentinel.ID {
		t.Fatalf("after the missed changes: %s %+v, want %s for the sentinel", ev.ID, ch, want)
	}

	// A fresh EventSource carries the id in the query.
	q := openSSE(t, u.base+"/ui/events?last_event_id="+last, "")
	if ev, _ := q.change(); ev.ID != fmt.Sprintf("%s-%d", epoch, seq+1) {
		t.Fatalf("resume by query: %s", ev.ID)
	}

	// Unknown ids get a fresh snapshot.
	for _, id := range []string{"deadbeef-3", epoch + "-999999", "garbage", epoch + "-"} {
		c := openSSE(t, u.base+"/ui/events", id)
		_, snap := c.snapshot()
		if len(snap.Products) != 2 {
			t.Fatalf("Last-Event-ID %q: snapshot %+v", id, snap)
		}
		c.close()
	}
}

// The model's change ids follow the change stream of one instance: a second
// instance's ids are unknown to the first (another epoch), so a browser
// moved between instances starts from a snapshot.
func TestSSEIdsAreInstanceScoped(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	one := e.startUI()
	two := e.startUI()
	p := e.create("quince", 1, 0)
	one.waitProduct(t, p.ID, 1)
	two.waitProduct(t, p.ID, 1)
	a := openSSE(t, one.base+"/ui/events", "")
	ev, _ := a.snapshot()
	b := openSSE(t, two.base+"/ui/events", ev.ID)
	if got, _ := b.snapshot(); strings.HasPrefix(got.ID, strings.Split(ev.ID, "-")[0]+"-") {
		t.Fatalf("two instances share the epoch of %s", ev.ID)
	}
}

// GET /ui/products/{id}/history proxies the products service.
func TestHistoryThroughTheUI(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.startUI()
	p := e.create("quark", 90, 2)
	e.adjust(p.ID, -2)
	var transitions []struct {
		Version int64  `json:"version"`
		Event   string `json:"event"`
		From    string `json:"from"`
		To      string `json:"to"`
	}
	if code := call(t, "GET", u.base+"/ui/products/"+p.ID+"/history", "", &transitions); code != http.StatusOK {
		t.Fatalf("history: %d", code)
	}
	var got []string
	for _, tr := range transitions {
		got = append(got, fmt.Sprintf("%d %s %s→%s", tr.Version, tr.Event, tr.From, tr.To))
	}
	want := []string{"1 create initialized→created", "2 add_inventory created→in_stock", "3 reduce_inventory in_stock→out_of_stock"}
	if !slices.Equal(got, want) {
		t.Fatalf("history %v, want %v", got, want)
	}
	for _, id := range []string{"0198f0c2-7d1e-7000-8000-000000000000", "not-a-uuid", "..%2F..%2Fhealthz"} {
		if code := call(t, "GET", u.base+"/ui/products/"+id+"/history", "", nil); code != http.StatusNotFound {
			t.Errorf("history of %s: %d, want 404", id, code)
		}
	}
}

// The page and its assets come from the binary, with a policy that keeps
// them to this origin.
func TestPageIsSelfContained(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.startUI()
	for path, ctype := range map[string]string{
		"/":                   "text/html",
		"/static/app.js":      "text/javascript",
		"/static/app.css":     "text/css",
		"/static/favicon.svg": "image/svg+xml",
		"/ui/diagram.svg":     "image/svg+xml",
		"/ui/products":        "application/json",
	} {
		res, err := http.Get(u.base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), ctype) {
			t.Errorf("GET %s: %d %s", path, res.StatusCode, res.Header.Get("Content-Type"))
		}
		if csp := res.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
			t.Errorf("GET %s: Content-Security-Policy %q", path, csp)
		}
		// Nothing from another origin.
		if m := regexp.MustCompile(`(?i)(src|href)\s*=\s*["']?(https?:)?//`).Find(body); m != nil {
			t.Errorf("GET %s refers to another origin: %s", path, m)
		}
	}
	if code := call(t, "GET", u.base+"/static/missing.js", "", nil); code != http.StatusNotFound {
		t.Errorf("a missing asset: %d", code)
	}
	var l liveview.Snapshot
	if code := call(t, "GET", u.base+"/ui/products", "", &l); code != http.StatusOK || l.Products == nil {
		t.Errorf("an empty listing: %d %+v", code, l)
	}
}

// When the instance's queue vanishes (deleted, or expired during a long
// outage), the ui declares it again and rebuilds from a fresh latest
// replay; open pages start over from a snapshot. Stopping the ui ends the
// streams.
func TestUIRebuildsWhenItsQueueIsGone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.startUI()
	a := e.create("amaranth", 10, 3)
	b := e.create("barley", 20, 0)
	u.waitProduct(t, b.ID, b.Version)
	s := openSSE(t, u.base+"/ui/events", "")
	s.snapshot()

	conn, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete(u.prefix, false, false, false); err != nil {
		t.Fatal(err)
	}
	// The page learns the model was reset: an empty snapshot or a status
	// that says it is rebuilding, then the products again.
	eventually(t, waitFor, "the second replay", func() string {
		if got := metric(t, u.base, "statemill_ui_replays_total"); got != 2 {
			return fmt.Sprintf("replays_total %v", got)
		}
		return ""
	})
	if got := metric(t, u.base, "statemill_ui_reconnects_total"); got != 1 {
		t.Fatalf("reconnects_total = %v", got)
	}
	l := u.listing(t)
	if len(l.Products) != 2 || l.Status.Replaying || !l.Status.Connected {
		t.Fatalf("after the rebuild: %+v", l)
	}
	// The page's stream: a snapshot after the reset (the page starts over),
	// then the replayed products as changes.
	shown := map[string]int64{}
	reset := false
	for !reset || len(shown) != 2 {
		switch ev := s.next(); ev.Event {
		case "snapshot":
			var snap liveview.Snapshot
			if err := json.Unmarshal([]byte(ev.Data), &snap); err != nil {
				t.Fatal(err)
			}
			reset = true
			clear(shown)
			for _, p := range snap.Products {
				shown[p.ID] = p.Version
			}
		case "change":
			var ch liveview.Change
			if err := json.Unmarshal([]byte(ev.Data), &ch); err != nil {
				t.Fatal(err)
			}
			shown[ch.Product.ID] = ch.Product.Version
		}
	}
	if shown[a.ID] != a.Version || shown[b.ID] != b.Version {
		t.Fatalf("the page shows %v after the rebuild", shown)
	}
	// Live again.
	c := e.adjust(a.ID, -1)
	u.waitProduct(t, a.ID, c.Version)

	u.stop()
	if !s.waitEnded(waitFor) {
		t.Fatal("the stream outlived the ui")
	}
}
