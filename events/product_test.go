package events_test

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/statemachine"
)

func TestProductMachineValidates(t *testing.T) {
	d := events.ProductMachine
	if err := d.Validate(); err != nil {
		t.Fatalf("ProductMachine.Validate() = %v", err)
	}
	if d.Name != events.EntityType || d.Initial != events.Initialized {
		t.Errorf("name/initial = %q/%q", d.Name, d.Initial)
	}
	if got, want := d.StateNames(), []string{"initialized", "created", "in_stock", "out_of_stock", "discontinued"}; !reflect.DeepEqual(got, want) {
		t.Errorf("states = %q, want %q", got, want)
	}
	if got, want := d.EventNames(), []string{"create", "add_inventory", "reduce_inventory", "discontinue"}; !reflect.DeepEqual(got, want) {
		t.Errorf("events = %q, want %q", got, want)
	}
	if got, want := d.GuardNames(), []string{events.GuardHasInventory}; !reflect.DeepEqual(got, want) {
		t.Errorf("guards = %q, want %q", got, want)
	}
	// The engine accepts it with exactly the guard it names.
	if _, err := statemachine.NewWithConfig(statemachine.Config[int64]{
		Definition: d,
		Guards:     map[string]statemachine.Guard[int64]{events.GuardHasInventory: func(inv int64) bool { return inv > 0 }},
	}); err != nil {
		t.Fatalf("NewWithConfig(ProductMachine) = %v", err)
	}
}

// TestProductMachineAllows checks every row of the DESIGN §3 table and a few
// transitions that must stay illegal.
func TestProductMachineAllows(t *testing.T) {
	tests := []struct {
		event, from, to string
		want            bool
	}{
		{events.Create, events.Initialized, events.Created, true},
		{events.AddInventory, events.Created, events.InStock, true},
		{events.AddInventory, events.InStock, events.InStock, true},
		{events.AddInventory, events.OutOfStock, events.InStock, true},
		{events.ReduceInventory, events.InStock, events.InStock, true},
		{events.ReduceInventory, events.InStock, events.OutOfStock, true},
		{events.Discontinue, events.Created, events.Discontinued, true},
		{events.Discontinue, events.InStock, events.Discontinued, true},
		{events.Discontinue, events.OutOfStock, events.Discontinued, true},

		{events.Create, events.Created, events.Created, false},
		{events.Create, events.Discontinued, events.Created, false},
		{events.AddInventory, events.Initialized, events.InStock, false},
		{events.AddInventory, events.Discontinued, events.InStock, false},
		{events.AddInventory, events.Created, events.OutOfStock, false},
		{events.ReduceInventory, events.OutOfStock, events.OutOfStock, false},
		{events.ReduceInventory, events.Created, events.OutOfStock, false},
		{events.ReduceInventory, events.Discontinued, events.OutOfStock, false},
		{events.Discontinue, events.Initialized, events.Discontinued, false},
		{events.Discontinue, events.Discontinued, events.Discontinued, false},
		{"delete", events.Created, events.Discontinued, false},
	}
	for _, tc := range tests {
		if got := events.ProductMachine.Allows(tc.event, tc.from, tc.to); got != tc.want {
			t.Errorf("Allows(%s, %s → %s) = %v, want %v", tc.event, tc.from, tc.to, got, tc.want)
		}
	}
	if n := len(events.ProductMachine.Edges()); n != 9 {
		t.Errorf("Edges() has %d edges, want the 9 legal rows above", n)
	}
}

// TestReduceInventoryAlternatives: the guarded in_stock → in_stock comes
// first; the unguarded in_stock → out_of_stock is the fallback.
func TestReduceInventoryAlternatives(t *testing.T) {
	m, err := statemachine.NewWithConfig(statemachine.Config[int64]{
		Definition: events.ProductMachine,
		Guards:     map[string]statemachine.Guard[int64]{events.GuardHasInventory: func(inv int64) bool { return inv > 0 }},
	})
	if err != nil {
		t.Fatal(err)
	}
	for inventoryAfter, want := range map[int64]string{3: events.InStock, 1: events.InStock, 0: events.OutOfStock} {
		tr, err := m.Fire(inventoryAfter, events.InStock, events.ReduceInventory)
		if err != nil || tr.To != want {
			t.Errorf("reduce_inventory leaving %d = %+v, %v; want → %s", inventoryAfter, tr, err, want)
		}
	}
	if _, err := m.Fire(0, events.OutOfStock, events.ReduceInventory); err == nil {
		t.Error("reduce_inventory from out_of_stock succeeded")
	}
}

func TestProductAttributesJSON(t *testing.T) {
	a := events.ProductAttributes{ID: "p1", Name: "candy", Price: 100, Inventory: 2, State: events.InStock}
	b, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"id":"p1","name":"candy","price":100,"inventory":2,"state":"in_stock"}`
	if string(b) != want {
		t.Errorf("JSON = %s, want %s", b, want)
	}
	var back events.ProductAttributes
	if err := json.Unmarshal(b, &back); err != nil || back != a {
		t.Errorf("round trip = %+v, %v", back, err)
	}
}

// The README shows the machine as the engine draws it; the two must agree.
func TestReadmeShowsTheProductMachine(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if want := "```mermaid\n" + events.ProductMachine.Mermaid(); !strings.Contains(string(readme), want) {
		t.Fatalf("README.md does not contain the Product machine's diagram; put this in it:\n%s", want)
	}
}
