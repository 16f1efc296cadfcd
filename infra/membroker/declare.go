package membroker

import (
	"strings"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// ExchangeDeclare creates the exchange, or checks that the existing one has
// the same kind, flags and alternate exchange (406 otherwise).
func (ch *channel) ExchangeDeclare(name, kind string, durable, autoDelete, internal, noWait bool, args amqp091.Table) error {
	return ch.sync(func(*effects) error {
		if !knownKind(kind) {
			if kind == amqp091.ExchangeHeaders {
				return exception(amqp091.NotImplemented, "membroker does not implement exchange type '%s'", kind)
			}
			return exception(amqp091.CommandInvalid, "unknown exchange type '%s'", kind)
		}
		if name == "" {
			return errDefaultExchange()
		}
		if x, ok := ch.b.exchanges[name]; ok {
			return x.equivalent(kind, durable, autoDelete, internal, args)
		}
		if strings.HasPrefix(name, "amq.") {
			return exception(amqp091.AccessRefused, "exchange name '%s' contains reserved prefix 'amq.*'", name)
		}
		var alternate string
		v, hasAlternate := args["alternate-exchange"]
		if hasAlternate {
			s, ok := v.(string)
			if !ok {
				return exception(amqp091.PreconditionFailed, "invalid type '%s' for arg 'alternate-exchange' in exchange '%s' in vhost '/'", typeName(v), name)
			}
			alternate = s
		}
		ch.b.exchanges[name] = newExchange(name, kind, durable, autoDelete, internal, copyTable(args), alternate, hasAlternate)
		return nil
	})
}

// ExchangeDeclarePassive checks that the exchange exists (404 otherwise);
// flags and arguments are not compared, as in RabbitMQ.
func (ch *channel) ExchangeDeclarePassive(name, kind string, durable, autoDelete, internal, noWait bool, args amqp091.Table) error {
	return ch.sync(func(*effects) error {
		if name == "" {
			return errDefaultExchange()
		}
		if _, ok := ch.b.exchanges[name]; !ok {
			return errNoExchange(name)
		}
		return nil
	})
}

// ExchangeDelete deletes the exchange and its bindings; a missing one is
// not an error (RabbitMQ 3.10 made delete idempotent).
func (ch *channel) ExchangeDelete(name string, ifUnused, noWait bool) error {
	return ch.sync(func(*effects) error {
		if name == "" {
			return errDefaultExchange()
		}
		x, ok := ch.b.exchanges[name]
		if !ok {
			return nil
		}
		if x.system {
			return exception(amqp091.AccessRefused, "deletion of system exchange '%s' in vhost '/' not allowed", name)
		}
		if ifUnused && len(x.bindings) > 0 {
			return exception(amqp091.PreconditionFailed, "exchange '%s' in vhost '/' in use", name)
		}
		ch.b.deleteExchangeLocked(x)
		return nil
	})
}

// QueueDeclare creates the queue (a server-named one for ""), or checks the
// existing one as RabbitMQ does. The result counts ready messages and
// consumers.
func (ch *channel) QueueDeclare(name string, durable, autoDelete, exclusive, noWait bool, args amqp091.Table) (amqp091.Queue, error) {
	var out amqp091.Queue
	err := ch.sync(func(*effects) error {
		b := ch.b
		if q, ok := b.queues[name]; ok {
			if err := q.access(ch.conn); err != nil {
				return err
			}
			if err := q.equivalent(durable, autoDelete, exclusive, args, ch.conn); err != nil {
				return err
			}
			b.armExpiryLocked(q) // a redeclare is a use
			ch.lastQueue, out = q.name, q.info()
			return nil
		}
		if name == "" {
			name = b.serverNamedLocked()
		} else if strings.HasPrefix(name, "amq.") {
			return exception(amqp091.AccessRefused, "queue name '%s' contains reserved prefix 'amq.*'", name)
		}
		qa, err := parseQueueArgs(name, args)
		if err != nil {
			return err
		}
		q := newQueue(name, durable, autoDelete, exclusive, copyTable(args), qa)
		if exclusive {
			q.owner = ch.conn
			ch.conn.exclusive[q] = struct{}{}
		}
		b.queues[name] = q
		b.armExpiryLocked(q)
		ch.lastQueue, out = q.name, q.info()
		return nil
	})
	return out, err
}

// QueueDeclarePassive reports the queue's counts, 404 when it is missing;
// flags and arguments are not compared, as in RabbitMQ.
func (ch *channel) QueueDeclarePassive(name string, durable, autoDelete, exclusive, noWait bool, args amqp091.Table) (amqp091.Queue, error) {
	var out amqp091.Queue
	err := ch.sync(func(*effects) error {
		q, err := ch.queueLocked(name)
		if err != nil {
			return err
		}
		ch.b.armExpiryLocked(q)
		ch.lastQueue, out = q.name, q.info()
		return nil
	})
	return out, err
}

// queueLocked finds a queue the channel may use: 404 if missing, 405 if
// another connection's exclusive queue. "" is the channel's last declared
// queue, as in RabbitMQ.
func (ch *channel) queueLocked(name string) (*queue, error) {
	if name == "" {
		name = ch.lastQueue
	}
	q, ok := ch.b.queues[name]
	if !ok {
		return nil, errNoQueue(name)
	}
	if err := q.access(ch.conn); err != nil {
		return nil, err
	}
	return q, nil
}

// QueueBind binds the queue to the exchange with key (idempotently).
// Binding arguments are accepted and ignored: no supported exchange kind
// routes by them.
func (ch *channel) QueueBind(name, key, exchange string, noWait bool, args amqp091.Table) error {
	return ch.sync(func(*effects) error {
		if exchange == "" {
			return errDefaultExchange()
		}
		q, err := ch.queueLocked(name)
		if err != nil {
			return err
		}
		x, ok := ch.b.exchanges[exchange]
		if !ok {
			return errNoExchange(exchange)
		}
		ch.b.bindLocked(x, q, key)
		return nil
	})
}

// QueueUnbind removes a binding; a missing queue, exchange or binding is not
// an error, as in RabbitMQ 3.10.
func (ch *channel) QueueUnbind(name, key, exchange string, args amqp091.Table) error {
	return ch.sync(func(*effects) error {
		if exchange == "" {
			return errDefaultExchange()
		}
		if name == "" {
			name = ch.lastQueue
		}
		q, qok := ch.b.queues[name]
		x, xok := ch.b.exchanges[exchange]
		if !qok || !xok {
			return nil
		}
		if err := q.access(ch.conn); err != nil {
			return err
		}
		ch.b.unbindLocked(x, q, key)
		return nil
	})
}

// QueuePurge drops the queue's ready messages and returns how many; the
// delivered ones still wait for their acks.
func (ch *channel) QueuePurge(name string, noWait bool) (int, error) {
	var n int
	err := ch.sync(func(*effects) error {
		q, err := ch.queueLocked(name)
		if err != nil {
			return err
		}
		n = len(q.ready)
		clear(q.ready)
		q.ready = nil
		return nil
	})
	return n, err
}

// QueueDelete deletes the queue and returns how many ready messages it
// held; a missing queue is not an error (RabbitMQ 3.10).
func (ch *channel) QueueDelete(name string, ifUnused, ifEmpty, noWait bool) (int, error) {
	var n int
	err := ch.sync(func(fx *effects) error {
		if name == "" {
			name = ch.lastQueue
		}
		q, ok := ch.b.queues[name]
		if !ok {
			return nil
		}
		if err := q.access(ch.conn); err != nil {
			return err
		}
		if ifUnused && len(q.consumers) > 0 {
			return exception(amqp091.PreconditionFailed, "queue '%s' in vhost '/' in use", name)
		}
		if ifEmpty && len(q.ready) > 0 {
			return exception(amqp091.PreconditionFailed, "queue '%s' in vhost '/' is not empty", name)
		}
		n = len(q.ready)
		ch.b.deleteQueueLocked(q, fx)
		return nil
	})
	return n, err
}
