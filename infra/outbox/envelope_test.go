package outbox

import (
	"reflect"
	"testing"

	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
)

// capture is a publisher that keeps what it is given.
type capture struct{ msgs []*message.Message }

func (c *capture) Publish(_ string, msgs ...*message.Message) error {
	c.msgs = append(c.msgs, msgs...)
	return nil
}
func (c *capture) Close() error { return nil }

// unwrapEnvelope reads exactly what Watermill's forwarder.Publisher writes
// into the outbox, so the two relays publish the same message.
func TestUnwrapEnvelopeReadsWatermillsEnvelope(t *testing.T) {
	t.Parallel()
	inner := &capture{}
	pub := forwarder.NewPublisher(inner, forwarder.PublisherConfig{ForwarderTopic: "outbox"})
	msg := message.NewMessage("0190a1b2-0000-7000-8000-000000000001", []byte(`{"id":"e1","binary":"\u0000\u00ff"}`))
	msg.Metadata.Set("correlation_id", "corr-1")
	msg.Metadata.Set("schema_version", "1")
	if err := pub.Publish("widget.create", msg); err != nil {
		t.Fatal(err)
	}
	if len(inner.msgs) != 1 {
		t.Fatalf("forwarder published %d messages, want 1", len(inner.msgs))
	}
	topic, got, err := unwrapEnvelope(inner.msgs[0].Payload)
	if err != nil {
		t.Fatalf("unwrap: %v", err)
	}
	if topic != "widget.create" || got.UUID != msg.UUID || string(got.Payload) != string(msg.Payload) ||
		!reflect.DeepEqual(got.Metadata, msg.Metadata) {
		t.Fatalf("unwrapped %q %s %s %v; want %q %s %s %v", topic, got.UUID, got.Payload, got.Metadata,
			"widget.create", msg.UUID, msg.Payload, msg.Metadata)
	}
}

func TestUnwrapEnvelopeRefusesWhatTheForwarderRefuses(t *testing.T) {
	t.Parallel()
	for _, payload := range []string{``, `[]`, `{"uuid":"x"}`, `{"destination_topic":"","uuid":"x"}`, `{"destination_topic":"a","payload":"not base64!"}`} {
		if _, _, err := unwrapEnvelope([]byte(payload)); err == nil {
			t.Errorf("unwrap accepted %s", payload)
		}
	}
	if _, m, err := unwrapEnvelope([]byte(`{"destination_topic":"a.b","uuid":"u"}`)); err != nil || m.Metadata == nil {
		t.Errorf("an envelope without payload and metadata: %v, metadata %v", err, m)
	}
}
