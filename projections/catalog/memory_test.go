package catalog_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/projections/catalog"
)

func productEvent(t *testing.T, id string, version int64, event, from, to string, inventory int64) envelope.Event {
	t.Helper()
	attrs, err := json.Marshal(events.ProductAttributes{Name: "p-" + id[:8], Price: 100, Inventory: inventory, State: to})
	if err != nil {
		t.Fatal(err)
	}
	return envelope.Event{
		ID: uuid.NewString(), EntityType: events.EntityType, EntityID: id, Version: version,
		Event: event, From: from, To: to, Attributes: attrs, OccurredAt: time.Now().UTC(),
	}
}

// The in-memory catalog keeps the newest version of each product whatever
// the order and the duplicates it receives, filters by state, and forgets
// everything on Reset (before a replay refills it).
func TestMemoryKeepsNewestVersion(t *testing.T) {
	ctx := context.Background()
	m := catalog.NewMemory(nil)
	a, b := uuid.NewString(), uuid.NewString()
	v1 := productEvent(t, a, 1, "create", "initialized", "created", 0)
	v2 := productEvent(t, a, 2, "add_inventory", "created", "in_stock", 5)
	v3 := productEvent(t, a, 3, "reduce_inventory", "in_stock", "out_of_stock", 0)
	b1 := productEvent(t, b, 1, "create", "initialized", "created", 0)
	m.Apply([]envelope.Event{v2, v1, b1})
	m.Apply([]envelope.Event{v3, v2}) // v2 again: a duplicate changes nothing

	all, err := m.Products(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 {
		t.Fatalf("products = %d, want 2", len(all))
	}
	got := map[string]catalog.Product{}
	for _, p := range all {
		got[p.ID] = p
	}
	if p := got[a]; p.Version != 3 || p.State != "out_of_stock" || p.Inventory != 0 {
		t.Fatalf("product a = %+v, want version 3 out_of_stock", p)
	}
	if all[0].ID > all[1].ID {
		t.Fatalf("products not ordered by id: %s, %s", all[0].ID, all[1].ID)
	}
	created, err := m.Products(ctx, "created")
	if err != nil || len(created) != 1 || created[0].ID != b {
		t.Fatalf("created = %+v, %v; want only b", created, err)
	}
	if _, err := m.Products(ctx, "sold"); err == nil {
		t.Fatal("an unknown state was accepted")
	}
	s, err := m.Stats(ctx)
	if err != nil || s.Products != 2 || s.ByState["out_of_stock"] != 1 || s.ByState["created"] != 1 {
		t.Fatalf("stats = %+v, %v", s, err)
	}

	m.Reset()
	if all, _ := m.Products(ctx, ""); len(all) != 0 {
		t.Fatalf("after Reset: %d products", len(all))
	}
}

// An event whose transition the Product machine does not allow is counted once.
func TestMemoryCountsIllegalTransitions(t *testing.T) {
	m := catalog.NewMemory(nil)
	bad := productEvent(t, uuid.NewString(), 1, "discontinue", "initialized", "in_stock", 0)
	m.Apply([]envelope.Event{bad, bad})
	if n := m.IllegalTransitions(); n != 1 {
		t.Fatalf("illegal transitions = %d, want 1", n)
	}
}
