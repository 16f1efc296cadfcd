package liveview_test

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/statemachine"
	"github.com/statemill/statemill/projections/liveview"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func newModel(t *testing.T, c liveview.Config) *liveview.Model {
	t.Helper()
	if c.Logger == nil {
		c.Logger = quiet
	}
	m, err := liveview.New(c)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

var at = time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC)

// ev is transition version of product id, with its attributes.
func ev(id string, version int64, event, from, to, name string, price, inventory int64) envelope.Event {
	attrs, _ := json.Marshal(events.ProductAttributes{ID: id, Name: name, Price: price, Inventory: inventory, State: to})
	return envelope.Event{
		ID: fmt.Sprintf("%s-v%d", id, version), SchemaVersion: 1, EntityType: events.EntityType, EntityID: id,
		Version: version, Event: event, From: from, To: to, Attributes: attrs,
		OccurredAt: at.Add(time.Duration(version) * time.Second),
	}
}

// candy is a product's history: created, stocked, sold out, discontinued.
func candy(id string) []envelope.Event {
	return []envelope.Event{
		ev(id, 1, events.Create, events.Initialized, events.Created, "candy", 100, 0),
		ev(id, 2, events.AddInventory, events.Created, events.InStock, "candy", 100, 5),
		ev(id, 3, events.ReduceInventory, events.InStock, events.OutOfStock, "candy", 100, 0),
		ev(id, 4, events.Discontinue, events.OutOfStock, events.Discontinued, "candy", 100, 0),
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []liveview.Config{{Epoch: "Not-OK"}, {Epoch: strings.Repeat("a", 33)}, {History: -1}} {
		if _, err := liveview.New(c); err == nil {
			t.Errorf("New(%+v) accepted a bad config", c)
		}
	}
	m := newModel(t, liveview.Config{})
	if !regexp.MustCompile(`^[0-9a-f]{8}$`).MatchString(m.Epoch()) {
		t.Fatalf("default epoch %q", m.Epoch())
	}
	if newModel(t, liveview.Config{}).Epoch() == m.Epoch() {
		t.Fatal("two models share an epoch")
	}
}

func TestApplyNewestVersionWins(t *testing.T) {
	m := newModel(t, liveview.Config{Epoch: "e1"})
	h := candy("p1")
	m.Apply(h[:2])
	p, ok := m.Product("p1")
	want := liveview.Product{ID: "p1", Name: "candy", Price: 100, Inventory: 5, State: events.InStock, Version: 2, UpdatedAt: at.Add(2 * time.Second)}
	if !ok || p != want {
		t.Fatalf("after v1, v2: %+v, want %+v", p, want)
	}
	seq := m.Snapshot().Seq
	m.Apply(h[:2])                  // duplicates
	m.Apply([]envelope.Event{h[0]}) // an old one, late
	if p, _ := m.Product("p1"); p != want || m.Snapshot().Seq != seq {
		t.Fatalf("duplicates changed the model: %+v seq %d → %d", p, seq, m.Snapshot().Seq)
	}
	// Out of order: v4 before v3; v3 then changes nothing.
	m.Apply([]envelope.Event{h[3], h[2]})
	if p, _ := m.Product("p1"); p.Version != 4 || p.State != events.Discontinued {
		t.Fatalf("after v4, v3: %+v", p)
	}
	changes, last, ok := m.Since(seq)
	if !ok || len(changes) != 1 || changes[0].Product.Version != 4 || last != seq+1 {
		t.Fatalf("changes since %d: %+v last %d ok %v; want just v4", seq, changes, last, ok)
	}
	c := changes[0]
	if c.Event != events.Discontinue || c.From != events.OutOfStock || c.To != events.Discontinued || c.Seq != seq+1 {
		t.Fatalf("change %+v", c)
	}

	// Other entity types are not products; unreadable attributes are skipped.
	other := ev("w1", 1, "create", "initialized", "created", "x", 1, 1)
	other.EntityType = "widget"
	bad := ev("p2", 1, events.Create, events.Initialized, events.Created, "x", 1, 1)
	bad.Attributes = json.RawMessage(`"not an object"`)
	m.Apply([]envelope.Event{other, bad})
	if m.Len() != 1 || m.Malformed() != 1 {
		t.Fatalf("len %d malformed %d after foreign and malformed events", m.Len(), m.Malformed())
	}
}

func TestSnapshotAndCounts(t *testing.T) {
	m := newModel(t, liveview.Config{Epoch: "e1"})
	m.Apply([]envelope.Event{
		ev("p3", 2, events.AddInventory, events.Created, events.InStock, "Zucchini", 250, 3),
		ev("p1", 1, events.Create, events.Initialized, events.Created, "apple", 50, 0),
		ev("p2", 2, events.AddInventory, events.Created, events.InStock, "Banana", 30, 9),
	})
	s := m.Snapshot()
	var names []string
	for _, p := range s.Products {
		names = append(names, p.Name)
	}
	if !slices.Equal(names, []string{"apple", "Banana", "Zucchini"}) || s.Seq != 3 || s.Epoch != "e1" {
		t.Fatalf("snapshot %+v", s)
	}
	want := map[string]int{events.Initialized: 0, events.Created: 1, events.InStock: 2, events.OutOfStock: 0, events.Discontinued: 0}
	if fmt.Sprint(s.Counts) != fmt.Sprint(want) {
		t.Fatalf("counts %v, want %v", s.Counts, want)
	}
	// JSON: an empty model is an empty list, not null.
	b, _ := json.Marshal(newModel(t, liveview.Config{}).Snapshot())
	if !bytes.Contains(b, []byte(`"products":[]`)) {
		t.Fatalf("empty snapshot %s", b)
	}
}

func TestResume(t *testing.T) {
	m := newModel(t, liveview.Config{Epoch: "e1", History: 4})
	if got := m.EventID(7); got != "e1-7" {
		t.Fatalf("EventID = %q", got)
	}
	for i := range 6 {
		m.Apply([]envelope.Event{ev("p"+strconv.Itoa(i), 1, events.Create, events.Initialized, events.Created, "n"+strconv.Itoa(i), 1, 0)})
	}
	// Kept: changes 3..6.
	for _, c := range []struct {
		id   string
		ok   bool
		seqs []uint64
	}{
		{"e1-6", true, nil},
		{"e1-5", true, []uint64{6}},
		{"e1-2", true, []uint64{3, 4, 5, 6}},
		{"e1-1", false, nil}, // change 2 is no longer kept
		{"e1-0", false, nil},
		{"e1-7", false, nil},  // from the future: another life of the epoch
		{"e0-5", false, nil},  // another epoch
		{"e1-x", false, nil},  // malformed
		{"e1", false, nil},    // malformed
		{"", false, nil},      // none
		{"e1--1", false, nil}, // malformed
	} {
		changes, last, ok := m.Resume(c.id)
		var seqs []uint64
		for _, ch := range changes {
			seqs = append(seqs, ch.Seq)
		}
		if ok != c.ok || !slices.Equal(seqs, c.seqs) || (ok && last != 6) {
			t.Errorf("Resume(%q) = %v, %d, %v; want %v, 6, %v", c.id, seqs, last, ok, c.seqs, c.ok)
		}
	}

	// A reset is a change no one can resume across.
	m.Reset()
	if m.Len() != 0 {
		t.Fatal("Reset kept products")
	}
	for _, id := range []string{"e1-6", "e1-5"} {
		if _, _, ok := m.Resume(id); ok {
			t.Errorf("Resume(%q) across a reset succeeded", id)
		}
	}
	s := m.Snapshot()
	if s.Seq != 7 || len(s.Products) != 0 {
		t.Fatalf("snapshot after reset: %+v", s)
	}
	if changes, last, ok := m.Since(s.Seq); !ok || len(changes) != 0 || last != 7 {
		t.Fatalf("Since(snapshot after reset) = %v %d %v", changes, last, ok)
	}
	m.Apply(candy("p9")[:1])
	if changes, _, ok := m.Since(s.Seq); !ok || len(changes) != 1 || changes[0].Seq != 8 {
		t.Fatalf("after reset and a change: %+v %v", changes, ok)
	}
}

func TestWatchersNeverBlockTheModel(t *testing.T) {
	m := newModel(t, liveview.Config{Epoch: "e1", History: 8})
	slow := m.Watch() // never reads until the end
	defer slow.Close()
	fast := m.Watch()
	cursor := m.Snapshot().Seq
	var got []uint64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range fast.C() {
			changes, last, ok := m.Since(cursor)
			if !ok { // fell out of the history: start over from a snapshot
				last = m.Snapshot().Seq
			}
			for _, c := range changes {
				got = append(got, c.Seq)
			}
			cursor = last
			if cursor >= 500 {
				return
			}
		}
	}()
	for i := range 500 {
		m.Apply([]envelope.Event{ev("p"+strconv.Itoa(i), 1, events.Create, events.Initialized, events.Created, "x", 1, 0)})
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the fast watcher did not see change 500")
	}
	fast.Close()
	// The fast watcher saw changes in order, without repeats (skipping
	// only what a snapshot covered), and got to the end.
	if !slices.IsSorted(got) || len(slices.Compact(slices.Clone(got))) != len(got) || cursor != 500 {
		t.Fatalf("fast watcher at %d saw %v", cursor, got)
	}
	// The slow one has one wake-up pending and fell out of the history.
	select {
	case <-slow.C():
	default:
		t.Fatal("the slow watcher was not woken")
	}
	if _, _, ok := m.Since(0); ok {
		t.Fatal("a watcher 500 changes behind can resume from a history of 8")
	}
	if m.Watchers() != 1 {
		t.Fatalf("%d watchers after closing one", m.Watchers())
	}
	slow.Close()
	slow.Close() // idempotent
	if m.Watchers() != 0 {
		t.Fatalf("%d watchers after closing all", m.Watchers())
	}
}

func TestStatusWakesWatchers(t *testing.T) {
	m := newModel(t, liveview.Config{})
	if st := m.Status(); st.Connected || !st.Replaying {
		t.Fatalf("initial status %+v", st)
	}
	w := m.Watch()
	defer w.Close()
	m.SetStatus(liveview.Status{Connected: true})
	select {
	case <-w.C():
	default:
		t.Fatal("a status change did not wake the watcher")
	}
	m.SetStatus(liveview.Status{Connected: true})
	select {
	case <-w.C():
		t.Fatal("an unchanged status woke the watcher")
	default:
	}
}

// Readers, watchers and the writer run at once (go test -race).
func TestConcurrentUse(t *testing.T) {
	m := newModel(t, liveview.Config{History: 16})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := m.Watch()
			defer w.Close()
			for {
				select {
				case <-stop:
					return
				case <-w.C():
					s := m.Snapshot()
					m.Since(s.Seq)
					_ = m.Diagram()
				}
			}
		}()
	}
	for i := range 200 {
		m.Apply(candy("p" + strconv.Itoa(i%20)))
		if i%50 == 0 {
			m.Reset()
		}
	}
	close(stop)
	wg.Wait()
}

func TestDiagram(t *testing.T) {
	counts := map[string]int{events.Created: 1, events.InStock: 2}
	svg := liveview.Diagram(events.ProductMachine, counts)
	if !bytes.Equal(svg, liveview.Diagram(events.ProductMachine, counts)) {
		t.Fatal("the diagram is not deterministic")
	}
	// Well-formed XML, with what a page relies on.
	type text struct {
		Class string `xml:"class,attr"`
		State string `xml:"data-state,attr"`
		X     string `xml:"x,attr"`
		Body  string `xml:",chardata"`
	}
	type group struct {
		Class string `xml:"class,attr"`
		State string `xml:"data-state,attr"`
		Texts []text `xml:"text"`
		Paths []struct {
			From string `xml:"data-from,attr"`
			To   string `xml:"data-to,attr"`
		} `xml:"path"`
	}
	var doc struct {
		XMLName xml.Name `xml:"svg"`
		Role    string   `xml:"role,attr"`
		Title   string   `xml:"title"`
		Desc    string   `xml:"desc"`
		Groups  []group  `xml:"g"`
	}
	if err := xml.Unmarshal(svg, &doc); err != nil {
		t.Fatalf("the diagram is not well-formed XML: %v\n%s", err, svg)
	}
	if doc.Role != "img" || doc.Title != "Product state machine" || !strings.Contains(doc.Desc, "in stock: 2 products") ||
		!strings.Contains(doc.Desc, "reduce inventory from in stock to in stock if has inventory") {
		t.Fatalf("accessible name and description: %q / %q", doc.Title, doc.Desc)
	}

	// One box per state, in the order of the machine's flow, with its count.
	var states []string
	var xs []float64
	pairs := map[string]bool{}
	for _, g := range doc.Groups {
		if g.Class == "edges" {
			for _, p := range g.Paths {
				if p.From != "" {
					pairs[p.From+"→"+p.To] = true
				}
			}
		}
		if !strings.HasPrefix(g.Class, "state") {
			continue
		}
		states = append(states, g.State)
		occupied := strings.Contains(g.Class, "occupied")
		if occupied != (counts[g.State] > 0) {
			t.Errorf("state %s: class %q with count %d", g.State, g.Class, counts[g.State])
		}
		for _, tx := range g.Texts {
			if tx.Class == "count" {
				if tx.Body != liveview.CountText(counts[g.State]) || tx.State != g.State {
					t.Errorf("state %s shows %q", g.State, tx.Body)
				}
				x, _ := strconv.ParseFloat(tx.X, 64)
				xs = append(xs, x)
			}
		}
	}
	wantOrder := []string{events.Initialized, events.Created, events.InStock, events.OutOfStock, events.Discontinued}
	if !slices.Equal(states, wantOrder) || !slices.IsSorted(xs) || len(xs) != len(wantOrder) {
		t.Fatalf("states %v at %v, want %v left to right", states, xs, wantOrder)
	}
	// One arrow per pair of states the machine connects.
	want := map[string]bool{}
	for _, e := range events.ProductMachine.Edges() {
		want[e.From+"→"+e.To] = true
	}
	if fmt.Sprint(pairs) != fmt.Sprint(want) {
		t.Fatalf("arrows %v, want %v", pairs, want)
	}
	for _, label := range []string{">create<", ">add inventory<", ">reduce inventory<", ">[has inventory]<", ">discontinue<"} {
		if !bytes.Contains(svg, []byte(label)) {
			t.Errorf("no label %s", label)
		}
	}
	if liveview.CountText(1) != "1 product" || liveview.CountText(0) != "0 products" {
		t.Fatal("CountText")
	}
}

// Any machine draws, names are escaped, cycles and unreachable states do
// not break the layout.
func TestDiagramOfOtherMachines(t *testing.T) {
	def := statemachine.Definition{
		Name: "order", Initial: "new", States: []string{"new", "paid", "shipped", "a<b&c", "lost"},
		Events: []statemachine.EventSpec{
			{Name: "pay", Transitions: []statemachine.TransitionSpec{{From: []string{"new"}, To: "paid"}}},
			{Name: "ship", Transitions: []statemachine.TransitionSpec{{From: []string{"paid"}, To: "shipped"}}},
			{Name: "return", Transitions: []statemachine.TransitionSpec{{From: []string{"shipped"}, To: "new"}}},
			{Name: "odd", Transitions: []statemachine.TransitionSpec{{From: []string{"a<b&c"}, To: "a<b&c", Guard: "x\"y"}}},
		},
	}
	if err := def.Validate(); err != nil {
		t.Fatal(err)
	}
	svg := liveview.Diagram(def, nil)
	if err := xml.Unmarshal(svg, new(struct{})); err != nil {
		t.Fatalf("not well-formed: %v\n%s", err, svg)
	}
	if !bytes.Contains(svg, []byte("a&lt;b&amp;c")) || bytes.Contains(svg, []byte("a<b")) {
		t.Fatal("state names are not escaped")
	}
	if i, j := bytes.Index(svg, []byte(`data-state="new"`)), bytes.Index(svg, []byte(`data-state="shipped"`)); i < 0 || j < i {
		t.Fatal("the initial state does not come first")
	}
	// An empty machine still draws.
	if err := xml.Unmarshal(liveview.Diagram(statemachine.Definition{}, nil), new(struct{})); err != nil {
		t.Fatalf("empty machine: %v", err)
	}
}
