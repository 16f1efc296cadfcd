// Package commands holds the Product commands and their input validation.
// A command that passes Validate is well-formed; whether it may happen is
// the handler's business (it needs the entity's current state).
package commands

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/statemill/statemill/infra/apperr"
)

// MaxNameLength bounds a product name, in characters.
const MaxNameLength = 200

// CreateProduct creates a product in state created, or in_stock when
// InitialInventory is above zero (two transitions in one transaction).
type CreateProduct struct {
	Name             string `json:"name"`
	Price            int64  `json:"price"`
	InitialInventory int64  `json:"initial_inventory"`
	Idempotency
}

// Commands cross the command bus as JSON: every field has a JSON name.

// Idempotency makes a command safe to retry: a command whose Key an earlier
// committed command used returns that command's outcome without firing, if
// its Fingerprint (of the request) is the same, and is refused otherwise.
type Idempotency struct {
	Key         string `json:"idempotency_key,omitempty"`
	Fingerprint string `json:"request_fingerprint,omitempty"`
}

// Validate checks the fields; the name is trimmed.
func (c *CreateProduct) Validate() error {
	f := apperr.Fields{}
	c.Name = strings.TrimSpace(c.Name)
	switch {
	case c.Name == "":
		f.Add("name", "is required and must not be blank")
	case utf8.RuneCountInString(c.Name) > MaxNameLength:
		f.Add("name", "must be at most 200 characters")
	case strings.ContainsFunc(c.Name, unicode.IsControl):
		f.Add("name", "must not contain control characters")
	}
	if c.Price < 0 {
		f.Add("price", "must not be negative")
	}
	if c.InitialInventory < 0 {
		f.Add("initial_inventory", "must not be negative")
	}
	return f.Err()
}

// AdjustInventory adds (Adjust > 0) or removes (Adjust < 0) stock.
type AdjustInventory struct {
	ProductID string `json:"product_id"`
	// Adjust is a pointer so that a missing field and zero get their own messages.
	Adjust *int64 `json:"adjust_inventory"`
	// IfVersion, when above zero, must equal the product's version (If-Match).
	IfVersion int64 `json:"if_version,omitempty"`
	Idempotency
}

// Validate checks the fields.
func (c *AdjustInventory) Validate() error {
	f := apperr.Fields{}
	switch {
	case c.Adjust == nil:
		f.Add("adjust_inventory", "is required")
	case *c.Adjust == 0:
		f.Add("adjust_inventory", "cannot be zero")
	}
	return f.Err()
}

// DiscontinueProduct retires a product (a soft delete). Discontinuing a
// discontinued product succeeds and changes nothing.
type DiscontinueProduct struct {
	ProductID string `json:"product_id"`
	IfVersion int64  `json:"if_version,omitempty"`
	Idempotency
}

// Validate checks the fields.
func (c *DiscontinueProduct) Validate() error { return nil }
