package membroker

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

// channel is an AMQP channel on a conn. Topology methods live in
// declare.go, publishing in publish.go, consuming in consume.go,
// acknowledgements in ack.go.
type channel struct {
	b      *Broker
	conn   *conn
	id     int
	closed atomic.Bool

	// guarded by b.mu
	confirm      bool
	prefetch     int // per consumer, for the consumers started later
	globalLimit  int // across the channel's consumers (Qos global)
	unackedCount int
	lastTag      uint64
	lowTag       uint64 // no tag below it is pending
	pending      map[uint64]*pending
	consumers    map[string]*consumer // active ones, by tag
	pumps        []*consumer          // every consumer whose goroutine may still run
	lastQueue    string               // the queue "" stands for, as in RabbitMQ

	nmu      sync.RWMutex
	noNotify bool
	closes   []chan *amqp091.Error
	returns  []chan amqp091.Return
	cancels  []chan string
}

// pending is a delivery waiting for its ack.
type pending struct {
	tag uint64
	msg *message
	q   *queue
	c   *consumer
}

func newChannel(c *conn, id int) *channel {
	return &channel{b: c.b, conn: c, id: id, lowTag: 1, pending: map[uint64]*pending{}, consumers: map[string]*consumer{}}
}

// sync runs a method that has a reply in AMQP: under the broker lock, with
// a server exception closing the channel (or, for a hard error, the
// connection) and returned, as amqp091 returns it.
func (ch *channel) sync(op func(fx *effects) error) error {
	var fx effects
	err := ch.locked(&fx, op)
	fx.run()
	return err
}

func (ch *channel) locked(fx *effects, op func(fx *effects) error) error {
	ch.b.mu.Lock()
	defer ch.b.mu.Unlock()
	if ch.closed.Load() {
		return amqp091.ErrClosed
	}
	err := op(fx)
	ch.raiseLocked(err, fx)
	return err
}

// async runs a method that has no reply in AMQP (publish, ack, nack): a
// server exception closes the channel but is not returned, because over the
// wire the client learns of it only through the channel's close.
func (ch *channel) async(op func(fx *effects) error) error {
	err := ch.sync(op)
	var e *amqp091.Error
	if errors.As(err, &e) && e.Server {
		return nil
	}
	return err
}

func (ch *channel) raiseLocked(err error, fx *effects) {
	var e *amqp091.Error
	if !errors.As(err, &e) || !e.Server {
		return
	}
	if isHard(e.Code) {
		ch.conn.closeLocked(e, fx)
	} else {
		ch.closeLocked(e, fx)
	}
}

// closeLocked closes the channel with e (nil: the client closed it): its
// consumers go, its unacknowledged messages go back to their queues.
func (ch *channel) closeLocked(e *amqp091.Error, fx *effects) {
	if ch.closed.Load() {
		return
	}
	ch.closed.Store(true)
	delete(ch.conn.channels, ch.id)
	// Consumers first, so that the requeued messages are not handed back to
	// this channel.
	for _, c := range ch.consumers {
		ch.b.removeConsumerLocked(c, fx, false)
	}
	ch.b.requeueLocked(ch.settleAllLocked())
	fx.add(func() { ch.finish(e) })
}

// finish stops the delivery goroutines (closing the delivery channels) and
// tells the notification receivers, outside the broker lock.
func (ch *channel) finish(e *amqp091.Error) {
	for _, c := range ch.pumps {
		c.stop()
	}
	for _, c := range ch.pumps {
		<-c.done
	}
	ch.nmu.Lock()
	ch.noNotify = true
	closes, returns, cancels := ch.closes, ch.returns, ch.cancels
	ch.closes, ch.returns, ch.cancels = nil, nil, nil
	ch.nmu.Unlock()
	if e != nil {
		for _, r := range closes {
			r <- e
		}
	}
	for _, r := range closes {
		close(r)
	}
	for _, r := range returns {
		close(r)
	}
	for _, r := range cancels {
		close(r)
	}
}

// Close closes the channel; closing it again is a no-op, as in amqp091.
func (ch *channel) Close() error {
	var fx effects
	ch.b.mu.Lock()
	ch.closeLocked(nil, &fx)
	ch.b.mu.Unlock()
	fx.run()
	return nil
}

func (ch *channel) IsClosed() bool { return ch.closed.Load() }

// Qos sets the prefetch of the consumers started later on this channel, or
// with global the limit shared by all of them (RabbitMQ's reading of the
// flag). A prefetch size is not implemented by RabbitMQ either: 540.
func (ch *channel) Qos(prefetchCount, prefetchSize int, global bool) error {
	if prefetchCount < 0 || prefetchCount > 65535 {
		return fmt.Errorf("membroker: prefetch count %d is outside 0..65535", prefetchCount)
	}
	return ch.sync(func(*effects) error {
		if prefetchSize != 0 {
			return exception(amqp091.NotImplemented, "prefetch_size!=0 (%d)", prefetchSize)
		}
		if !global {
			ch.prefetch = prefetchCount
			return nil
		}
		ch.globalLimit = prefetchCount
		for _, c := range ch.consumers {
			ch.b.dispatchLocked(c.q)
		}
		return nil
	})
}

// Confirm puts the channel in confirm mode.
func (ch *channel) Confirm(noWait bool) error {
	return ch.sync(func(*effects) error {
		ch.confirm = true
		return nil
	})
}

func (ch *channel) NotifyClose(receiver chan *amqp091.Error) chan *amqp091.Error {
	ch.nmu.Lock()
	defer ch.nmu.Unlock()
	if ch.noNotify {
		close(receiver)
	} else {
		ch.closes = append(ch.closes, receiver)
	}
	return receiver
}

func (ch *channel) NotifyReturn(receiver chan amqp091.Return) chan amqp091.Return {
	ch.nmu.Lock()
	defer ch.nmu.Unlock()
	if ch.noNotify {
		close(receiver)
	} else {
		ch.returns = append(ch.returns, receiver)
	}
	return receiver
}

func (ch *channel) NotifyCancel(receiver chan string) chan string {
	ch.nmu.Lock()
	defer ch.nmu.Unlock()
	if ch.noNotify {
		close(receiver)
	} else {
		ch.cancels = append(ch.cancels, receiver)
	}
	return receiver
}

// notifyReturn hands r to the NotifyReturn receivers; the read lock keeps
// finish from closing them meanwhile.
func (ch *channel) notifyReturn(r amqp091.Return) {
	ch.nmu.RLock()
	defer ch.nmu.RUnlock()
	if ch.noNotify {
		return
	}
	for _, c := range ch.returns {
		c <- r
	}
}

func (ch *channel) notifyCancel(tag string) {
	ch.nmu.RLock()
	defer ch.nmu.RUnlock()
	if ch.noNotify {
		return
	}
	for _, c := range ch.cancels {
		c <- tag
	}
}

var (
	_ broker.Channel       = (*channel)(nil)
	_ amqp091.Acknowledger = (*channel)(nil)
)
