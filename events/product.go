// Package events is the published contract of the example domain: the Product
// entity type, its event and state names, the attribute snapshot every event
// carries, and the Product state machine as data (guards by name only; their
// code lives with the entity in handlers).
package events

import "github.com/statemill/statemill/infra/statemachine"

// EntityType is the entity type of products on the wire and in routing keys.
const EntityType = "product"

// Product events.
const (
	Create          = "create"
	AddInventory    = "add_inventory"
	ReduceInventory = "reduce_inventory"
	Discontinue     = "discontinue"
)

// Product states.
const (
	Initialized  = "initialized"
	Created      = "created"
	InStock      = "in_stock"
	OutOfStock   = "out_of_stock"
	Discontinued = "discontinued"
)

// GuardHasInventory holds when the product's inventory, after the reduction,
// is above zero.
const GuardHasInventory = "has_inventory"

// ProductMachine is the Product state machine (DESIGN §3). Treat it as
// read-only; statemachine.NewWithConfig takes its own copy.
var ProductMachine = statemachine.Definition{
	Name:    EntityType,
	Initial: Initialized,
	States:  []string{Initialized, Created, InStock, OutOfStock, Discontinued},
	Events: []statemachine.EventSpec{
		{Name: Create, Transitions: []statemachine.TransitionSpec{
			{From: []string{Initialized}, To: Created},
		}},
		{Name: AddInventory, Transitions: []statemachine.TransitionSpec{
			{From: []string{Created, InStock, OutOfStock}, To: InStock},
		}},
		{Name: ReduceInventory, Transitions: []statemachine.TransitionSpec{
			{From: []string{InStock}, To: InStock, Guard: GuardHasInventory},
			{From: []string{InStock}, To: OutOfStock},
		}},
		{Name: Discontinue, Transitions: []statemachine.TransitionSpec{
			{From: []string{Created, InStock, OutOfStock}, To: Discontinued},
		}},
	},
}

// ProductAttributes is the attribute snapshot carried by every Product event
// (entity_attributes on the wire). Price is in cents.
type ProductAttributes struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Price     int64  `json:"price"`
	Inventory int64  `json:"inventory"`
	State     string `json:"state"`
}
