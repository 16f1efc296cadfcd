package statemachine_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/statemill/statemill/infra/statemachine"
)

// The test machine is an order, deliberately not a product: it has several
// guards and an event (approve) with three ordered alternatives.
type order struct {
	Items      int
	Prepaid    bool
	CreditOK   bool
	Refundable bool
}

func orderDefinition() statemachine.Definition {
	return statemachine.Definition{
		Name:    "order",
		Initial: "draft",
		States:  []string{"draft", "placed", "paid", "awaiting_payment", "rejected", "shipped", "cancelled"},
		Events: []statemachine.EventSpec{
			{Name: "place", Transitions: []statemachine.TransitionSpec{
				{From: []string{"draft"}, To: "placed", Guard: "has_items"},
			}},
			{Name: "approve", Transitions: []statemachine.TransitionSpec{
				{From: []string{"placed"}, To: "paid", Guard: "prepaid"},
				{From: []string{"placed"}, To: "awaiting_payment", Guard: "credit_ok"},
				{From: []string{"placed"}, To: "rejected"},
			}},
			{Name: "pay", Transitions: []statemachine.TransitionSpec{
				{From: []string{"awaiting_payment"}, To: "paid"},
			}},
			{Name: "ship", Transitions: []statemachine.TransitionSpec{
				{From: []string{"paid"}, To: "shipped"},
			}},
			{Name: "cancel", Transitions: []statemachine.TransitionSpec{
				{From: []string{"draft", "placed", "awaiting_payment"}, To: "cancelled"},
				{From: []string{"paid"}, To: "cancelled", Guard: "refundable"},
			}},
		},
	}
}

func orderGuards() map[string]statemachine.Guard[order] {
	return map[string]statemachine.Guard[order]{
		"has_items":  func(o order) bool { return o.Items > 0 },
		"prepaid":    func(o order) bool { return o.Prepaid },
		"credit_ok":  func(o order) bool { return o.CreditOK },
		"refundable": func(o order) bool { return o.Refundable },
	}
}

func newOrderMachine(t testing.TB, hook func(statemachine.Transition)) *statemachine.Machine[order] {
	t.Helper()
	m, err := statemachine.NewWithConfig(statemachine.Config[order]{
		Definition:   orderDefinition(),
		Guards:       orderGuards(),
		OnTransition: hook,
	})
	if err != nil {
		t.Fatalf("NewWithConfig: %v", err)
	}
	return m
}

func TestDefinitionValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(d *statemachine.Definition)
		want   []string // substrings of the error; nil means valid
	}{
		{name: "valid", mutate: func(*statemachine.Definition) {}},
		{name: "empty machine name", mutate: func(d *statemachine.Definition) { d.Name = " " }, want: []string{"machine name is empty"}},
		{name: "no states", mutate: func(d *statemachine.Definition) { d.States = nil; d.Events = nil },
			want: []string{"no states declared", `initial state "draft" is not declared`}},
		{name: "empty initial", mutate: func(d *statemachine.Definition) { d.Initial = "" }, want: []string{"initial state is empty"}},
		{name: "undeclared initial", mutate: func(d *statemachine.Definition) { d.Initial = "nowhere" },
			want: []string{`initial state "nowhere" is not declared`}},
		{name: "empty state name", mutate: func(d *statemachine.Definition) { d.States = append(d.States, "") },
			want: []string{"state 7: empty name"}},
		{name: "duplicate state", mutate: func(d *statemachine.Definition) { d.States = append(d.States, "paid") },
			want: []string{`state "paid" declared twice`}},
		{name: "empty event name", mutate: func(d *statemachine.Definition) { d.Events[0].Name = "" },
			want: []string{"event 0: empty name"}},
		{name: "duplicate event", mutate: func(d *statemachine.Definition) { d.Events = append(d.Events, d.Events[0]) },
			want: []string{`event "place" declared twice`}},
		{name: "event without transitions", mutate: func(d *statemachine.Definition) { d.Events[2].Transitions = nil },
			want: []string{`event "pay": no transitions`}},
		{name: "transition without source", mutate: func(d *statemachine.Definition) { d.Events[2].Transitions[0].From = nil },
			want: []string{`event "pay" transition 0: no source state`}},
		{name: "undeclared source", mutate: func(d *statemachine.Definition) { d.Events[3].Transitions[0].From = []string{"paid", "limbo"} },
			want: []string{`event "ship" transition 0: source state "limbo" is not declared`}},
		{name: "undeclared target", mutate: func(d *statemachine.Definition) { d.Events[3].Transitions[0].To = "space" },
			want: []string{`event "ship" transition 0: target state "space" is not declared`}},
		{name: "duplicate source", mutate: func(d *statemachine.Definition) { d.Events[3].Transitions[0].From = []string{"paid", "paid"} },
			want: []string{`source state "paid" listed twice`}},
		{name: "blank guard", mutate: func(d *statemachine.Definition) { d.Events[3].Transitions[0].Guard = "  " },
			want: []string{"blank guard name"}},
		{name: "unreachable alternative", mutate: func(d *statemachine.Definition) {
			alts := d.Events[1].Transitions
			alts[0], alts[2] = alts[2], alts[0] // unguarded "rejected" first shadows the rest
		}, want: []string{`event "approve" transition 1: unreachable from "placed"`, `event "approve" transition 2: unreachable`}},
		{name: "several problems at once", mutate: func(d *statemachine.Definition) { d.Name = ""; d.Events[4].Transitions[1].To = "x" },
			want: []string{"machine name is empty", `target state "x"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := orderDefinition()
			tc.mutate(&d)
			err := d.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want error containing %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	noop := func(order) bool { return true }
	tests := []struct {
		name   string
		config func() statemachine.Config[order]
		want   []string
	}{
		{name: "valid", config: func() statemachine.Config[order] {
			return statemachine.Config[order]{Definition: orderDefinition(), Guards: orderGuards()}
		}},
		{name: "zero config", config: func() statemachine.Config[order] { return statemachine.Config[order]{} },
			want: []string{"machine name is empty", "no states declared"}},
		{name: "missing guard", config: func() statemachine.Config[order] {
			g := orderGuards()
			delete(g, "credit_ok")
			return statemachine.Config[order]{Definition: orderDefinition(), Guards: g}
		}, want: []string{`guard "credit_ok" is used by the definition but not provided`}},
		{name: "nil guard", config: func() statemachine.Config[order] {
			g := orderGuards()
			g["prepaid"] = nil
			return statemachine.Config[order]{Definition: orderDefinition(), Guards: g}
		}, want: []string{`guard "prepaid" is nil`}},
		{name: "extra guard", config: func() statemachine.Config[order] {
			g := orderGuards()
			g["vip"] = noop
			return statemachine.Config[order]{Definition: orderDefinition(), Guards: g}
		}, want: []string{`guard "vip" is provided but not used`}},
		{name: "no guards at all", config: func() statemachine.Config[order] {
			return statemachine.Config[order]{Definition: orderDefinition()}
		}, want: []string{`"has_items"`, `"prepaid"`, `"credit_ok"`, `"refundable"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.config()
			err := c.Validate()
			m, nerr := statemachine.NewWithConfig(c)
			if tc.want == nil {
				if err != nil || nerr != nil || m == nil {
					t.Fatalf("Validate() = %v, NewWithConfig() = %v, %v; want valid", err, m, nerr)
				}
				return
			}
			if err == nil || nerr == nil || m != nil {
				t.Fatalf("Validate() = %v, NewWithConfig() = %v, %v; want errors", err, m, nerr)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) || !strings.Contains(nerr.Error(), w) {
					t.Errorf("errors %q / %q, want them to contain %q", err, nerr, w)
				}
			}
		})
	}
}

func TestFire(t *testing.T) {
	m := newOrderMachine(t, nil)
	tests := []struct {
		name      string
		subject   order
		from      string
		event     string
		wantTo    string
		reason    string   // non-empty: the expected TransitionError reason
		rejecting []string // guards reported as rejecting
	}{
		{name: "guard accepts", subject: order{Items: 1}, from: "draft", event: "place", wantTo: "placed"},
		{name: "single guard rejects", subject: order{}, from: "draft", event: "place",
			reason: "guard has_items rejected", rejecting: []string{"has_items"}},
		{name: "first alternative wins", subject: order{Prepaid: true, CreditOK: true}, from: "placed", event: "approve", wantTo: "paid"},
		{name: "second alternative", subject: order{CreditOK: true}, from: "placed", event: "approve", wantTo: "awaiting_payment"},
		{name: "unguarded fallback", subject: order{}, from: "placed", event: "approve", wantTo: "rejected"},
		{name: "from set", subject: order{}, from: "awaiting_payment", event: "cancel", wantTo: "cancelled"},
		{name: "later alternative for another source", subject: order{Refundable: true}, from: "paid", event: "cancel", wantTo: "cancelled"},
		{name: "guarded only alternative rejects", subject: order{}, from: "paid", event: "cancel",
			reason: "guard refundable rejected", rejecting: []string{"refundable"}},
		{name: "self-consistent chain", subject: order{}, from: "awaiting_payment", event: "pay", wantTo: "paid"},
		{name: "not allowed from state", subject: order{}, from: "shipped", event: "cancel", reason: statemachine.ReasonNotAllowed},
		{name: "terminal state", subject: order{Items: 3}, from: "cancelled", event: "place", reason: statemachine.ReasonNotAllowed},
		{name: "unknown event", subject: order{}, from: "draft", event: "teleport", reason: statemachine.ReasonUnknownEvent},
		{name: "unknown event wins over unknown state", subject: order{}, from: "limbo", event: "teleport", reason: statemachine.ReasonUnknownEvent},
		{name: "unknown state", subject: order{}, from: "limbo", event: "ship", reason: statemachine.ReasonUnknownState},
		{name: "empty state", subject: order{}, from: "", event: "ship", reason: statemachine.ReasonUnknownState},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := m.Fire(tc.subject, tc.from, tc.event)
			if can := m.Can(tc.subject, tc.from, tc.event); can != (err == nil) {
				t.Errorf("Can() = %v but Fire() error = %v", can, err)
			}
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("Fire() error = %v", err)
				}
				want := statemachine.Transition{Event: tc.event, From: tc.from, To: tc.wantTo}
				if got != want {
					t.Fatalf("Fire() = %+v, want %+v", got, want)
				}
				return
			}
			var te *statemachine.TransitionError
			if !errors.As(err, &te) {
				t.Fatalf("Fire() error = %v (%T), want *TransitionError", err, err)
			}
			if got != (statemachine.Transition{}) {
				t.Errorf("Fire() transition = %+v on failure, want zero", got)
			}
			if te.Reason != tc.reason || te.Machine != "order" || te.Event != tc.event || te.From != tc.from {
				t.Errorf("TransitionError = %+v, want reason %q", te, tc.reason)
			}
			if !reflect.DeepEqual(te.Guards, tc.rejecting) || te.GuardRejected() != (tc.rejecting != nil) {
				t.Errorf("Guards = %q, GuardRejected = %v, want %q", te.Guards, te.GuardRejected(), tc.rejecting)
			}
		})
	}
}

func TestFireReportsEveryRejectingGuard(t *testing.T) {
	d := statemachine.Definition{
		Name: "door", Initial: "closed", States: []string{"closed", "open", "ajar"},
		Events: []statemachine.EventSpec{{Name: "push", Transitions: []statemachine.TransitionSpec{
			{From: []string{"closed"}, To: "open", Guard: "unlocked"},
			{From: []string{"closed"}, To: "ajar", Guard: "chain_on"},
			{From: []string{"closed"}, To: "ajar", Guard: "unlocked"},
		}}},
	}
	m, err := statemachine.NewWithConfig(statemachine.Config[bool]{Definition: d, Guards: map[string]statemachine.Guard[bool]{
		"unlocked": func(bool) bool { return false },
		"chain_on": func(bool) bool { return false },
	}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Fire(false, "closed", "push")
	var te *statemachine.TransitionError
	if !errors.As(err, &te) || te.Reason != "guards unlocked, chain_on rejected" {
		t.Fatalf("Fire() error = %v, want guards unlocked, chain_on rejected", err)
	}
}

func TestTransitionErrorIsTyped(t *testing.T) {
	m := newOrderMachine(t, nil)
	_, err := m.Fire(order{}, "shipped", "approve")
	if err == nil {
		t.Fatal("Fire() succeeded, want error")
	}
	wrapped := fmt.Errorf("handler: %w", err)
	if !errors.Is(err, statemachine.ErrTransitionNotAllowed) || !errors.Is(wrapped, statemachine.ErrTransitionNotAllowed) {
		t.Errorf("errors.Is(%v, ErrTransitionNotAllowed) = false", wrapped)
	}
	if errors.Is(err, errors.New("transition not allowed")) {
		t.Error("errors.Is matched an unrelated error with the same text")
	}
	var te *statemachine.TransitionError
	if !errors.As(wrapped, &te) {
		t.Fatalf("errors.As(%v) = false", wrapped)
	}
	const want = `order: transition not allowed: event "approve" from state "shipped": not allowed from state`
	if err.Error() != want {
		t.Errorf("Error() = %q, want %q", err.Error(), want)
	}
}

func TestOnTransitionHook(t *testing.T) {
	var calls []statemachine.Transition
	m := newOrderMachine(t, func(tr statemachine.Transition) { calls = append(calls, tr) })
	steps := []struct {
		subject order
		event   string
		ok      bool
	}{
		{order{}, "place", false}, // guard rejects: no hook
		{order{Items: 2}, "place", true},
		{order{CreditOK: true}, "approve", true},
		{order{}, "ship", false}, // not allowed: no hook
		{order{}, "teleport", false},
		{order{}, "pay", true},
		{order{}, "ship", true},
	}
	state := m.Initial()
	var want []statemachine.Transition
	for i, s := range steps {
		before := len(calls)
		tr, err := m.Fire(s.subject, state, s.event)
		if (err == nil) != s.ok {
			t.Fatalf("step %d: Fire(%s, %s) error = %v, want ok=%v", i, state, s.event, err, s.ok)
		}
		if !s.ok {
			if len(calls) != before {
				t.Fatalf("step %d: hook called on failure: %+v", i, calls[before:])
			}
			continue
		}
		if len(calls) != before+1 || calls[before] != tr {
			t.Fatalf("step %d: hook calls %+v, want exactly one %+v", i, calls[before:], tr)
		}
		want = append(want, tr)
		state = tr.To
	}
	wantPath := []statemachine.Transition{
		{Event: "place", From: "draft", To: "placed"},
		{Event: "approve", From: "placed", To: "awaiting_payment"},
		{Event: "pay", From: "awaiting_payment", To: "paid"},
		{Event: "ship", From: "paid", To: "shipped"},
	}
	if !reflect.DeepEqual(calls, wantPath) || !reflect.DeepEqual(want, wantPath) {
		t.Errorf("hook calls = %+v, want %+v", calls, wantPath)
	}
	// Can never calls the hook.
	if !m.Can(order{}, "placed", "approve") || len(calls) != len(wantPath) {
		t.Errorf("Can() called the hook")
	}
}

func TestAllows(t *testing.T) {
	d := orderDefinition()
	tests := []struct {
		event, from, to string
		want            bool
	}{
		{"place", "draft", "placed", true},
		{"approve", "placed", "paid", true},
		{"approve", "placed", "awaiting_payment", true},
		{"approve", "placed", "rejected", true},
		{"cancel", "draft", "cancelled", true},
		{"cancel", "awaiting_payment", "cancelled", true},
		{"cancel", "paid", "cancelled", true}, // guarded alternative counts too
		{"cancel", "shipped", "cancelled", false},
		{"approve", "placed", "shipped", false},
		{"ship", "placed", "shipped", false},
		{"teleport", "draft", "shipped", false},
		{"place", "limbo", "placed", false},
		{"", "", "", false},
	}
	for _, tc := range tests {
		if got := d.Allows(tc.event, tc.from, tc.to); got != tc.want {
			t.Errorf("Allows(%q, %q, %q) = %v, want %v", tc.event, tc.from, tc.to, got, tc.want)
		}
	}
}

func TestHelpers(t *testing.T) {
	d := orderDefinition()
	if got, want := d.EventNames(), []string{"place", "approve", "pay", "ship", "cancel"}; !reflect.DeepEqual(got, want) {
		t.Errorf("EventNames() = %q, want %q", got, want)
	}
	if got, want := d.GuardNames(), []string{"has_items", "prepaid", "credit_ok", "refundable"}; !reflect.DeepEqual(got, want) {
		t.Errorf("GuardNames() = %q, want %q", got, want)
	}
	if got, want := d.Targets("approve", "placed"), []string{"paid", "awaiting_payment", "rejected"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Targets() = %q, want %q", got, want)
	}
	if d.Targets("approve", "draft") != nil || d.Targets("nope", "draft") != nil {
		t.Error("Targets() of an impossible event is not nil")
	}
	if !d.HasState("rejected") || d.HasState("limbo") || !d.HasEvent("pay") || d.HasEvent("refund") {
		t.Error("HasState/HasEvent wrong")
	}
	s := d.StateNames()
	s[0] = "changed"
	if d.States[0] != "draft" {
		t.Error("StateNames() aliases the definition")
	}
}

func TestEdges(t *testing.T) {
	want := []statemachine.Edge{
		{Event: "place", From: "draft", To: "placed", Guard: "has_items"},
		{Event: "approve", From: "placed", To: "paid", Guard: "prepaid"},
		{Event: "approve", From: "placed", To: "awaiting_payment", Guard: "credit_ok"},
		{Event: "approve", From: "placed", To: "rejected"},
		{Event: "pay", From: "awaiting_payment", To: "paid"},
		{Event: "ship", From: "paid", To: "shipped"},
		{Event: "cancel", From: "draft", To: "cancelled"},
		{Event: "cancel", From: "placed", To: "cancelled"},
		{Event: "cancel", From: "awaiting_payment", To: "cancelled"},
		{Event: "cancel", From: "paid", To: "cancelled", Guard: "refundable"},
	}
	d := orderDefinition()
	got := d.Edges()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Edges() =\n%+v\nwant\n%+v", got, want)
	}
	for _, e := range got {
		if !d.Allows(e.Event, e.From, e.To) {
			t.Errorf("edge %+v not allowed", e)
		}
	}
}

func TestMermaid(t *testing.T) {
	got := orderDefinition().Mermaid()
	for _, line := range []string{
		"stateDiagram-v2\n",
		"    [*] --> draft\n",
		"    draft --> placed: place [has_items]\n",
		"    placed --> rejected: approve\n",
		"    paid --> cancelled: cancel [refundable]\n",
		"    rejected --> [*]\n",
		"    shipped --> [*]\n",
		"    cancelled --> [*]\n",
	} {
		if !strings.Contains(got, line) {
			t.Errorf("Mermaid() lacks %q:\n%s", line, got)
		}
	}
	if strings.Contains(got, "draft --> [*]") {
		t.Errorf("Mermaid() marks a non-terminal state as final:\n%s", got)
	}
}

func TestDefinitionJSONRoundTrip(t *testing.T) {
	d := orderDefinition()
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	var back statemachine.Definition
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, d) {
		t.Fatalf("round trip:\n%+v\nwant\n%+v", back, d)
	}
	if err := back.Validate(); err != nil {
		t.Fatalf("decoded definition invalid: %v", err)
	}
	// Wire shape: lower-case keys, guard omitted when empty.
	s := string(b)
	for _, frag := range []string{`"name":"order"`, `"initial":"draft"`, `"states":[`, `"events":[`,
		`{"from":["draft"],"to":"placed","guard":"has_items"}`, `{"from":["placed"],"to":"rejected"}`} {
		if !strings.Contains(s, frag) {
			t.Errorf("JSON %s lacks %s", s, frag)
		}
	}
	// The machine's self-description encodes identically.
	m := newOrderMachine(t, nil)
	mb, _ := json.Marshal(m.Definition())
	if string(mb) != s {
		t.Errorf("machine definition JSON differs:\n%s\n%s", mb, s)
	}
}

func TestMachineIsImmutable(t *testing.T) {
	d := orderDefinition()
	m, err := statemachine.NewWithConfig(statemachine.Config[order]{Definition: d, Guards: orderGuards()})
	if err != nil {
		t.Fatal(err)
	}
	// Mutating the input definition or the returned copy changes nothing.
	d.Events[3].Transitions[0].From[0] = "draft"
	d.States[0] = "x"
	c := m.Definition()
	c.Events[3].Transitions[0].To = "cancelled"
	c.Name = "other"
	if !reflect.DeepEqual(m.Definition(), orderDefinition()) {
		t.Errorf("Definition() = %+v, changed after mutation", m.Definition())
	}
	if tr, err := m.Fire(order{}, "paid", "ship"); err != nil || tr.To != "shipped" {
		t.Errorf("Fire after mutation = %+v, %v", tr, err)
	}
	if m.Name() != "order" || m.Initial() != "draft" {
		t.Errorf("Name/Initial = %q/%q", m.Name(), m.Initial())
	}
}

func TestConcurrentFire(t *testing.T) {
	var fired atomic.Int64
	m := newOrderMachine(t, func(statemachine.Transition) { fired.Add(1) })
	const workers, rounds = 8, 500
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				o := order{Prepaid: (i+w)%2 == 0, CreditOK: i%3 == 0}
				tr, err := m.Fire(o, "placed", "approve")
				if err != nil || !m.Definition().Allows(tr.Event, tr.From, tr.To) {
					t.Errorf("Fire = %+v, %v", tr, err)
					return
				}
				if _, err := m.Fire(o, "shipped", "approve"); err == nil {
					t.Error("Fire from shipped succeeded")
					return
				}
			}
		})
	}
	wg.Wait()
	if got := fired.Load(); got != workers*rounds {
		t.Errorf("hook fired %d times, want %d", got, workers*rounds)
	}
}

func TestFireDoesNotAllocate(t *testing.T) {
	m := newOrderMachine(t, func(statemachine.Transition) {})
	o := order{CreditOK: true}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := m.Fire(o, "placed", "approve"); err != nil {
			t.Fatal(err)
		}
		if !m.Can(o, "paid", "ship") || m.Can(o, "shipped", "ship") {
			t.Fatal("Can wrong")
		}
	})
	if allocs != 0 {
		t.Errorf("Fire/Can allocate %.1f times per run, want 0", allocs)
	}
}

func BenchmarkFire(b *testing.B) {
	m := newOrderMachine(b, func(statemachine.Transition) {})
	o := order{CreditOK: true}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Fire(o, "placed", "approve"); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzFire drives the order machine from its initial state with events (and
// guard outcomes) chosen by the fuzzer's bytes, checking every step against
// a naive reading of the definition. One byte per step:
//
//	bits 0-2: 0-4 an event; 5 an unknown event; 6 a declared event from an
//	          undeclared state; 7 restart from the initial state
//	bits 3-6: guards has_items, prepaid, credit_ok, refundable
func FuzzFire(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x11, 0x03, 0x04})             // place, approve(prepaid) → paid, ship, cancel refused
	f.Add([]byte{0x00, 0x08, 0x21, 0x02, 0x03})       // place rejected, place, approve(credit), pay, ship
	f.Add([]byte{0x08, 0x01, 0x04, 0x05, 0x06})       // place, approve → rejected, cancel refused, unknowns
	f.Add([]byte{0x08, 0x11, 0x04, 0x44, 0x07, 0x04}) // cancel from paid: refused, then refundable; restart; cancel draft

	def := orderDefinition()
	events := def.EventNames()
	guardBits := map[string]byte{"has_items": 1 << 3, "prepaid": 1 << 4, "credit_ok": 1 << 5, "refundable": 1 << 6}

	f.Fuzz(func(t *testing.T, data []byte) {
		var hooked []statemachine.Transition
		m := newOrderMachine(t, func(tr statemachine.Transition) { hooked = append(hooked, tr) })
		successes := 0
		state := m.Initial()
		for i, b := range data {
			from, event := state, ""
			switch op := int(b & 7); {
			case op < len(events):
				event = events[op]
			case op == 5:
				event = "unknown"
			case op == 6:
				from, event = "limbo", events[int(b>>3)%len(events)]
			default:
				state = m.Initial()
				continue
			}
			subject := order{
				Prepaid:    b&guardBits["prepaid"] != 0,
				CreditOK:   b&guardBits["credit_ok"] != 0,
				Refundable: b&guardBits["refundable"] != 0,
			}
			if b&guardBits["has_items"] != 0 {
				subject.Items = 1
			}
			wantTo, wantOK := oracle(def, from, event, func(g string) bool { return b&guardBits[g] != 0 })

			can := m.Can(subject, from, event)
			tr, err := m.Fire(subject, from, event)
			if can != (err == nil) {
				t.Fatalf("step %d: Can = %v, Fire error = %v", i, can, err)
			}
			if err != nil {
				var te *statemachine.TransitionError
				if !errors.As(err, &te) || !errors.Is(err, statemachine.ErrTransitionNotAllowed) {
					t.Fatalf("step %d: error %v (%T) is not a *TransitionError", i, err, err)
				}
				if te.Event != event || te.From != from || te.Reason == "" {
					t.Fatalf("step %d: TransitionError %+v for %s from %s", i, te, event, from)
				}
				if wantOK {
					t.Fatalf("step %d: Fire(%s from %s) refused (%v), oracle says → %s", i, event, from, err, wantTo)
				}
				continue
			}
			successes++
			if !wantOK || tr.To != wantTo || tr.From != from || tr.Event != event {
				t.Fatalf("step %d: Fire(%s from %s) = %+v, oracle says %q ok=%v", i, event, from, tr, wantTo, wantOK)
			}
			if !def.Allows(tr.Event, tr.From, tr.To) {
				t.Fatalf("step %d: fired %+v, not allowed by the definition", i, tr)
			}
			if len(hooked) != successes || hooked[len(hooked)-1] != tr {
				t.Fatalf("step %d: hook saw %d transitions (last %+v), want %d ending in %+v", i, len(hooked), hooked, successes, tr)
			}
			state = tr.To
			if !def.HasState(state) {
				t.Fatalf("step %d: state %q is not declared", i, state)
			}
		}
		if len(hooked) != successes {
			t.Fatalf("hook called %d times for %d successes", len(hooked), successes)
		}
	})
}

// oracle reads the definition literally: the first alternative of the event
// listing from whose guard (if any) holds.
func oracle(d statemachine.Definition, from, event string, guard func(string) bool) (string, bool) {
	for _, ev := range d.Events {
		if ev.Name != event {
			continue
		}
		for _, t := range ev.Transitions {
			for _, f := range t.From {
				if f == from && (t.Guard == "" || guard(t.Guard)) {
					return t.To, true
				}
			}
		}
	}
	return "", false
}
