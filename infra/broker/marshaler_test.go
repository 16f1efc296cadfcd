package broker_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
)

func TestMarshalSetsStatemillProperties(t *testing.T) {
	t.Parallel()
	msg := message.NewMessage("0198f0c2-7d1e-7000-8000-000000000001", []byte(`{"id":"x"}`))
	msg.Metadata.Set(envelope.HeaderCorrelationID, "corr-1")
	msg.Metadata.Set(envelope.HeaderSchemaVersion, "1")

	p, err := broker.Marshaler{}.Marshal(msg)
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	if p.MessageId != msg.UUID {
		t.Errorf("MessageId = %q, want %q", p.MessageId, msg.UUID)
	}
	if p.ContentType != "application/json" {
		t.Errorf("ContentType = %q, want application/json", p.ContentType)
	}
	if p.CorrelationId != "corr-1" {
		t.Errorf("CorrelationId = %q, want corr-1", p.CorrelationId)
	}
	if p.DeliveryMode != 2 { // amqp091.Persistent
		t.Errorf("DeliveryMode = %d, want 2 (persistent)", p.DeliveryMode)
	}
	if string(p.Body) != `{"id":"x"}` {
		t.Errorf("Body = %q", p.Body)
	}
	if p.Timestamp.IsZero() {
		t.Error("Timestamp not set")
	}
	for k, want := range map[string]string{
		envelope.HeaderCorrelationID:     "corr-1",
		envelope.HeaderSchemaVersion:     "1",
		amqp.DefaultMessageUUIDHeaderKey: msg.UUID,
	} {
		if got, _ := p.Headers[k].(string); got != want {
			t.Errorf("header %s = %#v, want %q", k, p.Headers[k], want)
		}
	}
	if err := p.Headers.Validate(); err != nil {
		t.Errorf("headers are not a valid AMQP table: %v", err)
	}
}

func TestMarshalWithoutCorrelationID(t *testing.T) {
	t.Parallel()
	p, err := broker.Marshaler{}.Marshal(message.NewMessage("id-1", []byte(`{}`)))
	if err != nil {
		t.Fatal(err)
	}
	if p.CorrelationId != "" || p.MessageId != "id-1" || p.ContentType != "application/json" {
		t.Fatalf("got correlation %q message id %q content type %q", p.CorrelationId, p.MessageId, p.ContentType)
	}
}

func TestUnmarshalToleratesNonStringHeaders(t *testing.T) {
	t.Parallel()
	death := []any{amqp091.Table{
		"count":        int64(1),
		"exchange":     "events",
		"queue":        "catalog.live",
		"reason":       "rejected",
		"routing-keys": []any{"product.create"},
		"time":         time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC),
	}}
	d := amqp091.Delivery{
		MessageId: "from-property",
		Body:      []byte(`{"id":"x"}`),
		Headers: amqp091.Table{
			amqp.DefaultMessageUUIDHeaderKey: "from-header",
			envelope.HeaderCorrelationID:     "corr-9",
			envelope.HeaderSchemaVersion:     "1",
			"x-death":                        death,
			"attempts":                       int32(3),
			"big":                            int64(1) << 40,
			"flag":                           true,
			"raw":                            []byte("bytes"),
		},
		Redelivered: true,
	}
	// Watermill's default marshaler refuses exactly this delivery; make sure
	// the test exercises the case the wrapper exists for.
	if _, err := (amqp.DefaultMarshaler{}).Unmarshal(d); err == nil {
		t.Log("note: watermill's DefaultMarshaler accepted non-string headers; the wrapper is no longer needed for that")
	}

	msg, err := broker.Marshaler{}.Unmarshal(d)
	if err != nil {
		t.Fatalf("Unmarshal: %v", err)
	}
	if msg.UUID != "from-header" {
		t.Errorf("UUID = %q, want the uuid header", msg.UUID)
	}
	if string(msg.Payload) != `{"id":"x"}` {
		t.Errorf("Payload = %q", msg.Payload)
	}
	if _, ok := msg.Metadata[amqp.DefaultMessageUUIDHeaderKey]; ok {
		t.Error("the uuid header leaked into the metadata")
	}
	for k, want := range map[string]string{
		envelope.HeaderCorrelationID:  "corr-9",
		envelope.HeaderSchemaVersion:  "1",
		"attempts":                    "3",
		"big":                         "1099511627776",
		"flag":                        "true",
		"raw":                         "bytes",
		"_watermill_amqp_redelivered": "true",
	} {
		if got := msg.Metadata.Get(k); got != want {
			t.Errorf("metadata %s = %q, want %q", k, got, want)
		}
	}
	xd := msg.Metadata.Get("x-death")
	var decoded []map[string]any
	if err := json.Unmarshal([]byte(xd), &decoded); err != nil {
		t.Fatalf("x-death metadata %q is not JSON: %v", xd, err)
	}
	if len(decoded) != 1 || decoded[0]["queue"] != "catalog.live" || decoded[0]["reason"] != "rejected" {
		t.Errorf("x-death metadata = %s", xd)
	}
}

func TestUnmarshalFallsBackToMessageID(t *testing.T) {
	t.Parallel()
	for name, headers := range map[string]amqp091.Table{
		"no headers":        nil,
		"no uuid header":    {envelope.HeaderCorrelationID: "c"},
		"empty uuid header": {amqp.DefaultMessageUUIDHeaderKey: ""},
		"non-string uuid":   {amqp.DefaultMessageUUIDHeaderKey: int32(7)},
	} {
		msg, err := broker.Marshaler{}.Unmarshal(amqp091.Delivery{MessageId: "mid-1", Headers: headers, Body: []byte("{}")})
		if err != nil {
			t.Fatalf("%s: Unmarshal: %v", name, err)
		}
		if msg.UUID != "mid-1" {
			t.Errorf("%s: UUID = %q, want the message_id mid-1", name, msg.UUID)
		}
		if msg.Metadata.Get("_watermill_amqp_redelivered") != "" {
			t.Errorf("%s: not redelivered, but metadata says so", name)
		}
	}
}

func TestMarshalUnmarshalRoundTrip(t *testing.T) {
	t.Parallel()
	in := message.NewMessage("round-trip-id", []byte(`{"a":1}`))
	in.Metadata.Set(envelope.HeaderCorrelationID, "c-1")
	in.Metadata.Set(envelope.HeaderReplayID, "r-1")
	p, err := broker.Marshaler{}.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := broker.Marshaler{}.Unmarshal(amqp091.Delivery{
		Headers: p.Headers, Body: p.Body, MessageId: p.MessageId, ContentType: p.ContentType,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !out.Equals(in) {
		t.Fatalf("round trip changed the message: in %s %v %s, out %s %v %s",
			in.UUID, in.Metadata, in.Payload, out.UUID, out.Metadata, out.Payload)
	}
	if strings.Contains(strings.Join(keys(out.Metadata), ","), amqp.DefaultMessageUUIDHeaderKey) {
		t.Fatal("uuid header in metadata")
	}
}

func keys(m message.Metadata) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
