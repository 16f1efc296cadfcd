package membroker

import (
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// exchange routes by kind; the default exchange "" is not one of these (see
// routeLocked).
type exchange struct {
	name, kind                    string
	durable, autoDelete, internal bool
	system                        bool // amq.*: cannot be deleted
	args                          amqp091.Table
	alternate                     string
	hasAlternate                  bool
	bindings                      map[bindingKey]*binding
}

type bindingKey struct{ queue, key string }

type binding struct {
	q     *queue
	key   string
	words []string // topic exchanges: the pattern, split once
}

func newExchange(name, kind string, durable, autoDelete, internal bool, args amqp091.Table, alternate string, hasAlternate bool) *exchange {
	return &exchange{
		name: name, kind: kind, durable: durable, autoDelete: autoDelete, internal: internal,
		args: args, alternate: alternate, hasAlternate: hasAlternate,
		bindings: map[bindingKey]*binding{},
	}
}

func knownKind(kind string) bool {
	switch kind {
	case amqp091.ExchangeDirect, amqp091.ExchangeFanout, amqp091.ExchangeTopic:
		return true
	}
	return false
}

// collect adds to out the queues the exchange's own bindings route key to.
func (x *exchange) collect(key string, out *routeSet) {
	var words []string
	if x.kind == amqp091.ExchangeTopic {
		words = splitKey(key)
	}
	for _, bd := range x.bindings {
		switch x.kind {
		case amqp091.ExchangeFanout:
			out.add(bd.q)
		case amqp091.ExchangeDirect:
			if bd.key == key {
				out.add(bd.q)
			}
		case amqp091.ExchangeTopic:
			if topicMatch(bd.words, words) {
				out.add(bd.q)
			}
		}
	}
}

// routeSet is the queues one publish reaches, each once however many
// bindings lead to it.
type routeSet struct {
	queues []*queue
	seen   map[*queue]bool
}

func (s *routeSet) add(q *queue) {
	if s.seen == nil {
		s.seen = map[*queue]bool{}
	}
	if !s.seen[q] {
		s.seen[q] = true
		s.queues = append(s.queues, q)
	}
}

// lookupExchangeLocked finds an exchange by name; "" is the default
// exchange, returned as nil with ok true.
func (b *Broker) lookupExchangeLocked(name string) (x *exchange, ok bool) {
	if name == "" {
		return nil, true
	}
	x, ok = b.exchanges[name]
	return x, ok
}

// routeLocked returns the queues a message published to x (nil: the default
// exchange) with key reaches, following alternate exchanges while nothing
// takes it.
func (b *Broker) routeLocked(x *exchange, key string) []*queue {
	var out routeSet
	if x == nil {
		if q, ok := b.queues[key]; ok {
			out.add(q)
		}
		return out.queues
	}
	visited := map[*exchange]bool{}
	for x != nil && !visited[x] {
		visited[x] = true
		x.collect(key, &out)
		if len(out.queues) > 0 || !x.hasAlternate {
			break
		}
		ae, ok := b.exchanges[x.alternate]
		if !ok {
			b.log.Warn("membroker: alternate exchange missing; message dropped",
				"exchange", x.name, "alternate_exchange", x.alternate, "routing_key", key)
		}
		x = ae
	}
	return out.queues
}

// bindLocked binds q to x with key; binding twice is a no-op.
func (b *Broker) bindLocked(x *exchange, q *queue, key string) {
	k := bindingKey{q.name, key}
	if _, ok := x.bindings[k]; ok {
		return
	}
	x.bindings[k] = &binding{q: q, key: key, words: splitKey(key)}
	q.bindings[queueBinding{x.name, key}] = struct{}{}
}

// unbindLocked removes a binding, and an auto-delete exchange that loses
// its last one.
func (b *Broker) unbindLocked(x *exchange, q *queue, key string) {
	delete(x.bindings, bindingKey{q.name, key})
	delete(q.bindings, queueBinding{x.name, key})
	if x.autoDelete && len(x.bindings) == 0 {
		b.deleteExchangeLocked(x)
	}
}

func (b *Broker) deleteExchangeLocked(x *exchange) {
	if b.exchanges[x.name] != x {
		return
	}
	delete(b.exchanges, x.name)
	for k, bd := range x.bindings {
		delete(bd.q.bindings, queueBinding{x.name, k.key})
	}
	clear(x.bindings)
}
