package outbox

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ThreeDotsLabs/watermill/message"
)

// forwarderEnvelope is the JSON that Watermill's forwarder.Publisher stores
// as an outbox row's payload (components/forwarder/envelope.go, v1.5.1).
// The package keeps its envelope type unexported, so PipelinedRelay reads
// the same fields here; envelope_test.go wraps a message with Watermill's
// own publisher and checks that this unwraps it to the same message, so a
// change of the format upstream fails a test instead of the relay.
type forwarderEnvelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"` // base64 in the JSON, as encoding/json writes []byte
	Metadata         map[string]string `json:"metadata"`
}

// errNoDestination is Watermill's own validation: an envelope without a
// destination topic is refused.
var errNoDestination = errors.New("outbox: envelope has no destination topic")

// unwrapEnvelope returns the destination topic (the routing key) and the
// original message of an outbox row's payload, as the forwarder does.
func unwrapEnvelope(payload []byte) (string, *message.Message, error) {
	var e forwarderEnvelope
	if err := json.Unmarshal(payload, &e); err != nil {
		return "", nil, fmt.Errorf("outbox: cannot unmarshal the forwarder envelope: %w", err)
	}
	if e.DestinationTopic == "" {
		return "", nil, errNoDestination
	}
	msg := message.NewMessage(e.UUID, e.Payload)
	if e.Metadata != nil {
		msg.Metadata = e.Metadata
	}
	return e.DestinationTopic, msg, nil
}
