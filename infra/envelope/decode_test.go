package envelope

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
	"time"
)

// decodeSamples are bodies of the shape producers send, and near misses.
func decodeSamples() [][]byte {
	base := validEvent()
	base.Attributes = json.RawMessage(`{"id": "0193b6b0-1234-7000-8000-00000000abcd", "name": "s4-1234", "price": 100, "state": "in_stock", "inventory": 1}`)
	variants := []func(*Event){
		func(*Event) {},
		func(e *Event) { e.Attributes = nil },
		func(e *Event) { e.Attributes = json.RawMessage(`{"a":{"b":[1,{"c":"}]\"{"}]},"d":"\u00e9<>&"}`) },
		func(e *Event) { e.From, e.To = "", "" },
		func(e *Event) { e.CorrelationID = "naïve <&> \"quoted\"" },
		func(e *Event) { e.Sequence, e.Version = 0, -1 },
		func(e *Event) { e.OccurredAt = time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600)) },
	}
	var out [][]byte
	for _, v := range variants {
		e := base
		v(&e)
		b, err := json.Marshal(e)
		if err != nil {
			panic(err)
		}
		out = append(out, b)
	}
	return append(out,
		[]byte(`{"ID":"x","schema_version":1}`),
		[]byte(`{"id":"x","schema_version":1.0,"sequence":1}`),
		[]byte(`{"id":"x","schema_version":01}`),
		[]byte(`{"id":"x","schema_version":99999999999999999999}`),
		[]byte(` {"id":"x"}`),
		[]byte(`{"id":"x","id":"y","schema_version":1,"entity_type":"a","entity_id":"b","version":1,"event":"c"}`),
		[]byte(`{"id":"\ud800","schema_version":1,"entity_type":"a","entity_id":"b","version":1,"event":"c"}`),
		[]byte("{\"id\":\"\xff\",\"schema_version\":1,\"entity_type\":\"a\",\"entity_id\":\"b\",\"version\":1,\"event\":\"c\"}"),
	)
}

// Decode (goccy/go-json) accepts what encoding/json accepts, and decodes it
// to the same event.
func TestDecodeMatchesEncodingJSON(t *testing.T) {
	for i, b := range decodeSamples() {
		if i < 5 {
			if _, err := Decode(b); err != nil {
				t.Errorf("sample %d is what a producer sends, but was refused: %v", i, err)
			}
		}
		checkAgainstEncodingJSON(t, b)
	}
}

// checkAgainstEncodingJSON fails when Decode and a decode by encoding/json
// followed by the same checks disagree on b.
func checkAgainstEncodingJSON(t *testing.T, b []byte) {
	t.Helper()
	got, err := Decode(b)
	var want Event
	werr := json.Unmarshal(b, &want)
	if werr == nil {
		werr = want.check()
	}
	if (err == nil) != (werr == nil) {
		t.Fatalf("Decode and encoding/json disagree on %q: %v against %v", b, err, werr)
	}
	if err == nil && !reflect.DeepEqual(got, want) {
		t.Fatalf("Decode and encoding/json differ on %q:\n%#v\n%#v", b, got, want)
	}
}

// FuzzDecodeMatchesEncodingJSON holds the library to encoding/json on
// arbitrary bodies.
func FuzzDecodeMatchesEncodingJSON(f *testing.F) {
	for _, b := range decodeSamples() {
		f.Add(b)
	}
	f.Fuzz(checkAgainstEncodingJSON)
}

// A batch round-trips, and one bad event makes the whole batch malformed.
func TestBatch(t *testing.T) {
	a, b := validEvent(), validEvent()
	b.ID, b.Version = "second", 2
	body, err := EncodeBatch([]Event{a, b})
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeBatch(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID != a.ID || got[1].ID != "second" || got[1].Version != 2 || !got[0].OccurredAt.Equal(a.OccurredAt) {
		t.Fatalf("round trip: %+v", got)
	}
	one, _ := json.Marshal(a)
	if single, err := Decode(one); err != nil || !reflect.DeepEqual(single, got[0]) {
		t.Fatalf("a batch's event differs from the same event's own body: %v", err)
	}
	b.EntityType = "Bad Type"
	bad, _ := EncodeBatch([]Event{a, b})
	for _, body := range [][]byte{bad, []byte(`null`), []byte(`{}`), []byte(`[1]`), []byte(`[`)} {
		if _, err := DecodeBatch(body); !errors.Is(err, ErrMalformed) {
			t.Errorf("DecodeBatch(%s) = %v, want ErrMalformed", body, err)
		}
	}
}

// BenchmarkDecode compares Decode with encoding/json on a producer's body.
func BenchmarkDecode(b *testing.B) {
	body := decodeSamples()[0]
	b.Run("goccy", func(b *testing.B) {
		for b.Loop() {
			if _, err := Decode(body); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			var e Event
			if err := json.Unmarshal(body, &e); err != nil {
				b.Fatal(err)
			}
		}
	})
}
