package membroker

import (
	"context"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

// Publish routes msg into every queue it reaches and returns once it is
// there: on a channel in confirm mode the Confirmation is already acked
// (also when no queue took it, as RabbitMQ acks those). A mandatory message
// no queue took goes to the NotifyReturn receivers first. A missing or
// internal exchange closes the channel (404, 403) and, as over the wire, is
// not returned here; the Confirmation then reports a nack.
func (ch *channel) Publish(ctx context.Context, exchange, key string, mandatory bool, msg amqp091.Publishing) (broker.Confirmation, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// amqp091 refuses a bad header table before sending: so does this, and
	// the channel stays open.
	if err := msg.Headers.Validate(); err != nil {
		return nil, err
	}
	p := stored(msg)
	var conf broker.Confirmation = broker.Acked()
	var ret *amqp091.Return
	err := ch.async(func(*effects) error {
		b := ch.b
		x, ok := b.lookupExchangeLocked(exchange)
		var refused error
		switch {
		case !ok:
			refused = errNoExchange(exchange)
		case x != nil && x.internal:
			refused = exception(amqp091.AccessRefused, "cannot publish to internal exchange '%s' in vhost '/'", exchange)
		case len(p.Body) > b.cfg.MaxMessageBytes:
			refused = exception(amqp091.PreconditionFailed, "message size %d is larger than configured max size %d", len(p.Body), b.cfg.MaxMessageBytes)
		}
		if refused != nil {
			if ch.confirm {
				conf = nacked{}
			}
			return refused
		}
		queues := b.routeLocked(x, key)
		if len(queues) == 0 && mandatory {
			r := returned(p, exchange, key)
			ret = &r
		}
		for _, q := range queues {
			q.enqueue(p, exchange, key)
			b.dispatchLocked(q)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// The return reaches its receivers before Publish returns, as RabbitMQ
	// sends basic.return before the confirm.
	if ret != nil {
		ch.notifyReturn(*ret)
	}
	return conf, nil
}

// nacked is the Confirmation of a publish the broker refused.
type nacked struct{}

var closedDone = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (nacked) Done() <-chan struct{} { return closedDone }
func (nacked) Acked() bool           { return false }
