package membroker

import (
	"fmt"
	"slices"
	"sync"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// consumer is one Consume. Deliveries are assigned to it under the broker
// lock (which is when they count against its prefetch) and handed to the
// application by its own goroutine, so that the broker never waits for a
// slow reader.
type consumer struct {
	tag       string
	ch        *channel
	q         *queue
	autoAck   bool
	exclusive bool
	prefetch  int
	unacked   int // guarded by b.mu

	out      chan amqp091.Delivery
	wake     chan struct{}
	stopped  chan struct{}
	stopOnce sync.Once
	done     chan struct{}

	mu        sync.Mutex
	outbox    []amqp091.Delivery
	cancelled bool
}

// Consume starts a consumer. An empty tag gets a generated one (amqp091
// makes one up client-side too); a tag in use on the channel is a
// connection exception (530), a consumer on a queue with an exclusive one,
// or an exclusive one on a queue with consumers, 403.
func (ch *channel) Consume(queue, consumerTag string, autoAck, exclusive, noLocal, noWait bool, args amqp091.Table) (<-chan amqp091.Delivery, error) {
	var out <-chan amqp091.Delivery
	err := ch.sync(func(*effects) error {
		b := ch.b
		q, err := ch.queueLocked(queue)
		if err != nil {
			return err
		}
		if consumerTag == "" {
			b.ctagSeq++
			consumerTag = fmt.Sprintf("ctag-membroker-%d", b.ctagSeq)
		}
		if _, taken := ch.consumers[consumerTag]; taken {
			return exception(amqp091.NotAllowed, "attempt to reuse consumer tag '%s'", consumerTag)
		}
		if (exclusive && len(q.consumers) > 0) || slices.ContainsFunc(q.consumers, func(c *consumer) bool { return c.exclusive }) {
			return exception(amqp091.AccessRefused, "queue '%s' in vhost '/' in exclusive use", q.name)
		}
		c := &consumer{
			tag: consumerTag, ch: ch, q: q, autoAck: autoAck, exclusive: exclusive, prefetch: ch.prefetch,
			out: make(chan amqp091.Delivery), wake: make(chan struct{}, 1),
			stopped: make(chan struct{}), done: make(chan struct{}),
		}
		q.consumers = append(q.consumers, c)
		q.disarmExpiry()
		ch.consumers[consumerTag] = c
		ch.pumps = slices.DeleteFunc(ch.pumps, (*consumer).exited)
		ch.pumps = append(ch.pumps, c)
		go c.pump()
		b.dispatchLocked(q)
		out = c.out
		return nil
	})
	return out, err
}

// Cancel stops a consumer: it gets nothing new, what it was already handed
// is still delivered, then its delivery channel closes (amqp091 does the
// same). Its unacknowledged messages stay so until acked or the channel
// closes. An unknown tag is not an error.
func (ch *channel) Cancel(consumerTag string, noWait bool) error {
	return ch.sync(func(fx *effects) error {
		if c, ok := ch.consumers[consumerTag]; ok {
			ch.b.removeConsumerLocked(c, fx, false)
		}
		return nil
	})
}

// removeConsumerLocked detaches c from its queue and channel; byServer
// tells its channel's NotifyCancel receivers (the queue was deleted). The
// queue's last consumer leaving deletes an auto-delete queue and starts the
// x-expires clock.
func (b *Broker) removeConsumerLocked(c *consumer, fx *effects, byServer bool) {
	q := c.q
	q.consumers = slices.DeleteFunc(q.consumers, func(x *consumer) bool { return x == c })
	if q.rr >= len(q.consumers) {
		q.rr = 0
	}
	delete(c.ch.consumers, c.tag)
	c.cancel()
	if byServer {
		ch, tag := c.ch, c.tag
		fx.add(func() { ch.notifyCancel(tag) })
	}
	if len(q.consumers) == 0 && !q.deleted {
		if q.autoDelete {
			b.deleteQueueLocked(q, fx)
		} else {
			b.armExpiryLocked(q)
		}
	}
}

// dispatchLocked hands q's ready messages to its consumers, round-robin,
// skipping those at their prefetch limit.
func (b *Broker) dispatchLocked(q *queue) {
	for len(q.ready) > 0 {
		c := q.nextConsumer()
		if c == nil {
			return
		}
		c.ch.deliverLocked(c, q.pop())
	}
}

func (q *queue) nextConsumer() *consumer {
	n := len(q.consumers)
	for i := range n {
		idx := (q.rr + i) % n
		if c := q.consumers[idx]; c.hasCapacity() {
			q.rr = (idx + 1) % n
			return c
		}
	}
	return nil
}

func (c *consumer) hasCapacity() bool {
	if c.autoAck {
		return true
	}
	if c.prefetch > 0 && c.unacked >= c.prefetch {
		return false
	}
	return c.ch.globalLimit == 0 || c.ch.unackedCount < c.ch.globalLimit
}

// deliverLocked gives m the channel's next delivery tag and queues it for
// c's goroutine.
func (ch *channel) deliverLocked(c *consumer, m *message) {
	ch.lastTag++
	tag := ch.lastTag
	if !c.autoAck {
		ch.pending[tag] = &pending{tag: tag, msg: m, q: c.q, c: c}
		c.unacked++
		ch.unackedCount++
	}
	c.push(m.delivery(ch, c.tag, tag))
}

func (c *consumer) push(d amqp091.Delivery) {
	c.mu.Lock()
	c.outbox = append(c.outbox, d)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// cancel lets the goroutine drain what it holds and end.
func (c *consumer) cancel() {
	c.mu.Lock()
	c.cancelled = true
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// stop ends the goroutine at once (the channel closed); what it held is
// requeued by the channel, not delivered.
func (c *consumer) stop() { c.stopOnce.Do(func() { close(c.stopped) }) }

func (c *consumer) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// pump hands the outbox to the application in order.
func (c *consumer) pump() {
	defer close(c.done)
	defer close(c.out)
	for {
		c.mu.Lock()
		if len(c.outbox) == 0 {
			cancelled := c.cancelled
			c.outbox = nil // let a burst's backing array go
			c.mu.Unlock()
			if cancelled {
				return
			}
			select {
			case <-c.wake:
				continue
			case <-c.stopped:
				return
			}
		}
		d := c.outbox[0]
		c.outbox[0] = amqp091.Delivery{}
		c.outbox = c.outbox[1:]
		c.mu.Unlock()
		select {
		case c.out <- d:
		case <-c.stopped:
			return
		}
	}
}
