package membroker

import (
	"slices"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// queue is an in-memory queue: ready messages in order, consumers served
// round-robin.
type queue struct {
	name                           string
	durable, autoDelete, exclusive bool
	owner                          *conn // exclusive queues
	args                           amqp091.Table
	queueArgs

	ready     []*message // ordered by seq
	nextSeq   uint64
	consumers []*consumer
	rr        int // the consumer to try first
	bindings  map[queueBinding]struct{}
	deleted   bool

	expiry    *time.Timer
	expiryGen uint64
}

type queueBinding struct{ exchange, key string }

// message is one message in one queue. pub is shared between the queues a
// publish reached and never changed; deliveries copy from it.
type message struct {
	seq         uint64 // its place in the queue, kept when requeued
	exchange    string // as published (not the alternate exchange)
	key         string
	pub         *amqp091.Publishing
	redelivered bool
}

func newQueue(name string, durable, autoDelete, exclusive bool, args amqp091.Table, qa queueArgs) *queue {
	return &queue{
		name: name, durable: durable, autoDelete: autoDelete, exclusive: exclusive,
		args: args, queueArgs: qa, bindings: map[queueBinding]struct{}{},
	}
}

func (q *queue) info() amqp091.Queue {
	return amqp091.Queue{Name: q.name, Messages: len(q.ready), Consumers: len(q.consumers)}
}

func (q *queue) enqueue(pub *amqp091.Publishing, exchange, key string) {
	q.nextSeq++
	q.ready = append(q.ready, &message{seq: q.nextSeq, exchange: exchange, key: key, pub: pub})
}

// requeue puts messages back where they were, as RabbitMQ does: merged into
// the ready list by their original place, so a single requeued message is
// next in line.
func (q *queue) requeue(msgs []*message) {
	if len(msgs) == 0 {
		return
	}
	slices.SortFunc(msgs, func(a, b *message) int { return cmpSeq(a.seq, b.seq) })
	merged := make([]*message, 0, len(q.ready)+len(msgs))
	i, j := 0, 0
	for i < len(q.ready) && j < len(msgs) {
		if q.ready[i].seq < msgs[j].seq {
			merged = append(merged, q.ready[i])
			i++
		} else {
			merged = append(merged, msgs[j])
			j++
		}
	}
	merged = append(merged, q.ready[i:]...)
	merged = append(merged, msgs[j:]...)
	q.ready = merged
}

func cmpSeq(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (q *queue) pop() *message {
	m := q.ready[0]
	q.ready[0] = nil
	q.ready = q.ready[1:]
	return m
}

// access refuses a connection other than the owner of an exclusive
// queue, with RabbitMQ's 405.
func (q *queue) access(c *conn) error {
	if q.owner != nil && q.owner != c {
		return errLocked(q.name)
	}
	return nil
}

// armExpiryLocked starts the x-expires clock of an unused queue; any use
// (a consumer, a redeclare) restarts it.
func (b *Broker) armExpiryLocked(q *queue) {
	q.disarmExpiry()
	if q.expires == 0 || q.deleted || len(q.consumers) > 0 {
		return
	}
	gen := q.expiryGen
	q.expiry = time.AfterFunc(q.expires, func() { b.expire(q, gen) })
}

func (q *queue) disarmExpiry() {
	q.expiryGen++
	if q.expiry != nil {
		q.expiry.Stop()
		q.expiry = nil
	}
}

func (b *Broker) expire(q *queue, gen uint64) {
	var fx effects
	b.mu.Lock()
	if !b.closed && !q.deleted && q.expiryGen == gen && len(q.consumers) == 0 {
		b.deleteQueueLocked(q, &fx)
	}
	b.mu.Unlock()
	fx.run()
}

// deleteQueueLocked deletes q with its bindings and ready messages; its
// consumers are cancelled as by the server (NotifyCancel). Messages it
// delivered and not yet got acked for are gone with it.
func (b *Broker) deleteQueueLocked(q *queue, fx *effects) {
	if q.deleted {
		return
	}
	q.deleted = true
	q.disarmExpiry()
	if b.queues[q.name] == q {
		delete(b.queues, q.name)
	}
	if q.owner != nil {
		delete(q.owner.exclusive, q)
	}
	for qb := range q.bindings {
		if x, ok := b.exchanges[qb.exchange]; ok {
			b.unbindLocked(x, q, qb.key)
		}
	}
	for _, c := range slices.Clone(q.consumers) {
		b.removeConsumerLocked(c, fx, true)
	}
	q.ready = nil
}
