package envelope

import (
	"encoding/json"
	"errors"
	"testing"
	"time"
)

func validEvent() Event {
	return Event{
		ID: "01a22440-fe48-74e2-8364-ae417a7cf9d0", SchemaVersion: 1, Sequence: 3, EntityType: "widget",
		EntityID: "01a22440-fe48-7279-8594-ef2e37883a3c", Version: 2, Event: "paint", From: "raw", To: "painted",
		Attributes: json.RawMessage(`{"colour":"red"}`), OccurredAt: time.Date(2026, 11, 28, 10, 0, 0, 123456000, time.UTC),
		CorrelationID: "c-1",
	}
}

func TestDecodeRoundTrip(t *testing.T) {
	want := validEvent()
	body, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(body)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != want.ID || got.Version != want.Version || !got.OccurredAt.Equal(want.OccurredAt) || string(got.Attributes) != string(want.Attributes) {
		t.Fatalf("round trip: %+v", got)
	}
	if got.RoutingKey() != "widget.paint" {
		t.Fatalf("routing key %q", got.RoutingKey())
	}
}

func TestDecodeRefusesMalformed(t *testing.T) {
	for name, mutate := range map[string]func(*Event){
		"no id":          func(e *Event) { e.ID = "" },
		"future schema":  func(e *Event) { e.SchemaVersion = 2 },
		"no schema":      func(e *Event) { e.SchemaVersion = 0 },
		"wildcard type":  func(e *Event) { e.EntityType = "#" },
		"dotted event":   func(e *Event) { e.Event = "a.b" },
		"no entity":      func(e *Event) { e.EntityID = "" },
		"version zero":   func(e *Event) { e.Version = 0 },
		"upper-case one": func(e *Event) { e.EntityType = "Widget" },
	} {
		t.Run(name, func(t *testing.T) {
			e := validEvent()
			mutate(&e)
			body, _ := json.Marshal(e)
			if _, err := Decode(body); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Decode = %v, want ErrMalformed", err)
			}
		})
	}
	if _, err := Decode([]byte(`{"id":`)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("broken JSON: %v", err)
	}
}

func TestValidatePrefix(t *testing.T) {
	types := []string{"widget"}
	for _, ok := range []string{"catalog", "ui-7f3a", "a", "a0-b"} {
		if err := ValidatePrefix(ok, types, "replay"); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "widget", "replay", "Catalog", "a.b", "#", "*", "9lives", "-a", "a b",
		"abcdefghijklmnopqrstuvwxyzabcdefghijklmnop"} {
		if err := ValidatePrefix(bad, types, "replay"); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// FuzzDecode: any body either decodes into an event whose routing key is two
// safe words, or is refused as malformed; it never panics.
func FuzzDecode(f *testing.F) {
	good, _ := json.Marshal(validEvent())
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"id":"x","schema_version":1,"entity_type":"a","entity_id":"b","version":1,"event":"c"}`))
	f.Add([]byte(`{"id":"x","schema_version":1e400}`))
	f.Add([]byte(`[1,2,3]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		e, err := Decode(body)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		if !ValidName(e.EntityType) || !ValidName(e.Event) || e.ID == "" || e.Version < 1 {
			t.Fatalf("accepted an event that breaks the contract: %+v", e)
		}
	})
}
