package broker

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/envelope"
)

// Marshaler is Watermill's DefaultMarshaler made fit for statemill:
//   - Marshal sets message_id (the event id), content_type application/json,
//     the correlation id property and a timestamp, which the default leaves out;
//   - Unmarshal accepts headers that are not strings (x-death after
//     dead-lettering, headers from other publishers), which the default
//     refuses, so the message would be requeued forever before any handler
//     sees it; and it falls back to message_id when there is no uuid header.
type Marshaler struct{}

var defaultMarshaler = amqp.DefaultMarshaler{}

// Marshal implements amqp.Marshaler.
func (Marshaler) Marshal(msg *message.Message) (amqp091.Publishing, error) {
	p, err := defaultMarshaler.Marshal(msg)
	if err != nil {
		return p, err
	}
	p.MessageId = msg.UUID
	p.ContentType = "application/json"
	p.CorrelationId = msg.Metadata.Get(envelope.HeaderCorrelationID)
	p.Timestamp = time.Now().UTC()
	return p, nil
}

// Unmarshal implements amqp.Marshaler.
func (Marshaler) Unmarshal(d amqp091.Delivery) (*message.Message, error) {
	uuid := d.MessageId
	if v, ok := d.Headers[amqp.DefaultMessageUUIDHeaderKey].(string); ok && v != "" {
		uuid = v
	}
	msg := message.NewMessage(uuid, d.Body)
	for k, v := range d.Headers {
		if k == amqp.DefaultMessageUUIDHeaderKey {
			continue
		}
		msg.Metadata[k] = headerString(v)
	}
	if d.Redelivered {
		msg.Metadata.Set("_watermill_amqp_redelivered", "true")
	}
	return msg, nil
}

// headerString renders any AMQP field value as a string: strings as they
// are, everything else as JSON (or fmt as a last resort).
func headerString(v any) string {
	switch t := v.(type) {
	case string:
		return t
	case []byte:
		return string(t)
	}
	if b, err := json.Marshal(v); err == nil {
		return string(b)
	}
	return fmt.Sprint(v)
}
