package membroker

import (
	"sync"
	"sync/atomic"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

// conn is a connection to a Broker.
type conn struct {
	b      *Broker
	name   string
	closed atomic.Bool

	// guarded by b.mu
	channels  map[int]*channel
	nextID    int
	exclusive map[*queue]struct{}

	nmu      sync.Mutex
	noNotify bool
	closes   []chan *amqp091.Error
}

func newConn(b *Broker, name string) *conn {
	return &conn{b: b, name: name, channels: map[int]*channel{}, exclusive: map[*queue]struct{}{}}
}

func (c *conn) Channel() (broker.Channel, error) {
	b := c.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if c.closed.Load() {
		return nil, amqp091.ErrClosed
	}
	if len(c.channels) >= b.cfg.ChannelMax {
		return nil, amqp091.ErrChannelMax
	}
	// Ids are reused once free, as amqp091's allocator does.
	for {
		c.nextID = c.nextID%b.cfg.ChannelMax + 1
		if _, used := c.channels[c.nextID]; !used {
			break
		}
	}
	ch := newChannel(c, c.nextID)
	c.channels[ch.id] = ch
	return ch, nil
}

func (c *conn) NotifyClose(receiver chan *amqp091.Error) chan *amqp091.Error {
	c.nmu.Lock()
	defer c.nmu.Unlock()
	if c.noNotify {
		close(receiver)
	} else {
		c.closes = append(c.closes, receiver)
	}
	return receiver
}

func (c *conn) IsClosed() bool { return c.closed.Load() }

// Close closes the connection and its channels (their unacknowledged
// messages go back to their queues) and deletes its exclusive queues.
func (c *conn) Close() error {
	var fx effects
	c.b.mu.Lock()
	if c.closed.Load() {
		c.b.mu.Unlock()
		return amqp091.ErrClosed
	}
	c.closeLocked(nil, &fx)
	c.b.mu.Unlock()
	fx.run()
	return nil
}

// closeLocked closes the connection with e (nil: the client closed it).
func (c *conn) closeLocked(e *amqp091.Error, fx *effects) {
	if c.closed.Load() {
		return
	}
	c.closed.Store(true)
	delete(c.b.conns, c)
	for _, ch := range c.channels {
		ch.closeLocked(e, fx)
	}
	for q := range c.exclusive {
		c.b.deleteQueueLocked(q, fx)
	}
	fx.add(func() { c.finish(e) })
}

func (c *conn) finish(e *amqp091.Error) {
	c.nmu.Lock()
	c.noNotify = true
	closes := c.closes
	c.closes = nil
	c.nmu.Unlock()
	if e != nil {
		for _, r := range closes {
			r <- e
		}
	}
	for _, r := range closes {
		close(r)
	}
}

var _ broker.Conn = (*conn)(nil)
