package membroker

import (
	"bytes"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// copyTable deep-copies a header or argument table into what a client
// would decode after a trip through RabbitMQ: int becomes int32 (amqp091
// encodes it so), timestamps lose their sub-second part, byte slices and
// nested tables are copied, so no two consumers share a mutable value.
func copyTable(t amqp091.Table) amqp091.Table {
	if t == nil {
		return nil
	}
	out := make(amqp091.Table, len(t))
	for k, v := range t {
		out[k] = copyValue(v)
	}
	return out
}

func copyValue(v any) any {
	switch v := v.(type) {
	case int:
		return int32(v)
	case time.Time:
		return wireTime(v)
	case []byte:
		return bytes.Clone(v)
	case amqp091.Table:
		return copyTable(v)
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = copyValue(e)
		}
		return out
	}
	return v
}

// wireTime is t as an AMQP timestamp decodes: whole seconds, local time.
func wireTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return time.Unix(t.Unix(), 0)
}

// stored is the copy of a publishing the broker keeps: the caller may
// reuse its buffers once Publish returns.
func stored(msg amqp091.Publishing) *amqp091.Publishing {
	p := msg
	p.Headers = copyTable(msg.Headers)
	p.Body = bytes.Clone(msg.Body)
	p.Timestamp = wireTime(msg.Timestamp)
	return &p
}

// delivery builds what a consumer receives, with its own copies of the
// headers and body, filled as amqp091 fills it.
func (m *message) delivery(ch *channel, consumerTag string, tag uint64) amqp091.Delivery {
	p := m.pub
	return amqp091.Delivery{
		Acknowledger:    ch,
		Headers:         copyTable(p.Headers),
		ContentType:     p.ContentType,
		ContentEncoding: p.ContentEncoding,
		DeliveryMode:    p.DeliveryMode,
		Priority:        p.Priority,
		CorrelationId:   p.CorrelationId,
		ReplyTo:         p.ReplyTo,
		Expiration:      p.Expiration,
		MessageId:       p.MessageId,
		Timestamp:       p.Timestamp,
		Type:            p.Type,
		UserId:          p.UserId,
		AppId:           p.AppId,
		ConsumerTag:     consumerTag,
		DeliveryTag:     tag,
		Redelivered:     m.redelivered,
		Exchange:        m.exchange,
		RoutingKey:      m.key,
		Body:            bytes.Clone(p.Body),
	}
}

// returned builds the basic.return of a mandatory message no queue took.
func returned(p *amqp091.Publishing, exchange, key string) amqp091.Return {
	return amqp091.Return{
		ReplyCode:       amqp091.NoRoute,
		ReplyText:       "NO_ROUTE",
		Exchange:        exchange,
		RoutingKey:      key,
		ContentType:     p.ContentType,
		ContentEncoding: p.ContentEncoding,
		Headers:         copyTable(p.Headers),
		DeliveryMode:    p.DeliveryMode,
		Priority:        p.Priority,
		CorrelationId:   p.CorrelationId,
		ReplyTo:         p.ReplyTo,
		Expiration:      p.Expiration,
		MessageId:       p.MessageId,
		Timestamp:       p.Timestamp,
		Type:            p.Type,
		UserId:          p.UserId,
		AppId:           p.AppId,
		Body:            bytes.Clone(p.Body),
	}
}
