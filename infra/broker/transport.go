package broker

import (
	"context"
	"fmt"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Conn is a broker connection as statemill's components use it: RabbitMQ
// through Dial, or the in-process broker of the embedded mode. Its shape is
// amqp091's, and so are the values that cross it (Publishing, Delivery,
// Table, *Error with AMQP reply codes), so a component is written once and
// runs on either.
type Conn interface {
	// Channel opens a channel. A channel exception (a missing queue, a
	// refused bind) closes only that channel, as in AMQP.
	Channel() (Channel, error)
	// NotifyClose registers receiver for the connection's close: it gets the
	// error when the broker or the network closed it, nothing on Close, and
	// is closed itself in both cases.
	NotifyClose(receiver chan *amqp091.Error) chan *amqp091.Error
	IsClosed() bool
	Close() error
}

// Channel is the part of an AMQP channel statemill uses. Errors that the
// broker raises are *amqp091.Error with AMQP's reply codes (amqp091.NotFound
// for a passive declare of a missing queue, amqp091.PreconditionFailed for a
// redeclare with other arguments, amqp091.AccessRefused for a missing
// permission), and they close the channel.
type Channel interface {
	ExchangeDeclare(name, kind string, durable, autoDelete, internal, noWait bool, args amqp091.Table) error
	ExchangeDeclarePassive(name, kind string, durable, autoDelete, internal, noWait bool, args amqp091.Table) error
	ExchangeDelete(name string, ifUnused, noWait bool) error
	QueueDeclare(name string, durable, autoDelete, exclusive, noWait bool, args amqp091.Table) (amqp091.Queue, error)
	QueueDeclarePassive(name string, durable, autoDelete, exclusive, noWait bool, args amqp091.Table) (amqp091.Queue, error)
	QueueBind(name, key, exchange string, noWait bool, args amqp091.Table) error
	QueueUnbind(name, key, exchange string, args amqp091.Table) error
	QueuePurge(name string, noWait bool) (int, error)
	QueueDelete(name string, ifUnused, ifEmpty, noWait bool) (int, error)

	// Qos bounds the unacknowledged deliveries of the consumers started
	// after it on this channel.
	Qos(prefetchCount, prefetchSize int, global bool) error
	// Consume delivers the queue's messages until Cancel, or until the
	// channel closes, which closes the returned channel. Deliveries carry an
	// Acknowledger, so d.Ack and ch.Ack are the same.
	Consume(queue, consumer string, autoAck, exclusive, noLocal, noWait bool, args amqp091.Table) (<-chan amqp091.Delivery, error)
	Cancel(consumer string, noWait bool) error
	Ack(tag uint64, multiple bool) error
	Nack(tag uint64, multiple, requeue bool) error

	// Confirm puts the channel in confirm mode.
	Confirm(noWait bool) error
	// Publish sends msg. On a channel in confirm mode it returns the pending
	// confirmation of this message; otherwise a confirmation that is already
	// acked.
	Publish(ctx context.Context, exchange, key string, mandatory bool, msg amqp091.Publishing) (Confirmation, error)
	// NotifyReturn registers receiver for mandatory messages that no queue took.
	NotifyReturn(receiver chan amqp091.Return) chan amqp091.Return
	// NotifyCancel registers receiver for consumer tags the broker cancelled
	// (their queue was deleted).
	NotifyCancel(receiver chan string) chan string
	NotifyClose(receiver chan *amqp091.Error) chan *amqp091.Error
	IsClosed() bool
	Close() error
}

// Confirmation is the broker's answer to one publish in confirm mode.
type Confirmation interface {
	// Done is closed when the answer arrived, or the channel closed first.
	Done() <-chan struct{}
	// Acked reports, once Done is closed, whether the broker took
	// responsibility for the message (false: nacked, or the channel closed).
	Acked() bool
}

// Dialer opens a connection; name identifies it in the broker's tools
// (RabbitMQ's connection_name).
type Dialer func(name string) (Conn, error)

// DialTimeout bounds a TCP connect to RabbitMQ, so that a component that
// retries notices a broker that is down quickly.
const DialTimeout = 5 * time.Second

// AMQPDialer dials RabbitMQ at url.
func AMQPDialer(url string) Dialer {
	return func(name string) (Conn, error) { return Dial(url, name) }
}

// Dial connects to RabbitMQ with a 10 s heartbeat and names the connection.
func Dial(url, name string) (Conn, error) {
	props := amqp091.NewConnectionProperties()
	props.SetClientConnectionName(name)
	conn, err := amqp091.DialConfig(url, amqp091.Config{
		Heartbeat:  10 * time.Second,
		Locale:     "en_US",
		Dial:       amqp091.DefaultDial(DialTimeout),
		Properties: props,
	})
	if err != nil {
		return nil, fmt.Errorf("broker: dial %s: %w", name, err)
	}
	return &amqpConn{conn: conn}, nil
}

// WrapAMQP adapts a connection made with amqp091 directly (a test's, say).
func WrapAMQP(conn *amqp091.Connection) Conn { return &amqpConn{conn: conn} }

// WrapAMQPChannel adapts a channel opened with amqp091 directly, for the
// helpers that take a Channel (DeclareShared, CheckQueue).
func WrapAMQPChannel(ch *amqp091.Channel) Channel { return &amqpChannel{Channel: ch} }

type amqpConn struct{ conn *amqp091.Connection }

func (c *amqpConn) Channel() (Channel, error) {
	ch, err := c.conn.Channel()
	if err != nil {
		return nil, err
	}
	return &amqpChannel{Channel: ch}, nil
}

func (c *amqpConn) NotifyClose(r chan *amqp091.Error) chan *amqp091.Error {
	return c.conn.NotifyClose(r)
}
func (c *amqpConn) IsClosed() bool { return c.conn.IsClosed() }
func (c *amqpConn) Close() error   { return c.conn.Close() }

// amqpChannel is *amqp091.Channel with Publish returning a Confirmation.
type amqpChannel struct {
	*amqp091.Channel
	confirming bool
}

func (c *amqpChannel) Confirm(noWait bool) error {
	if err := c.Channel.Confirm(noWait); err != nil {
		return err
	}
	c.confirming = true
	return nil
}

func (c *amqpChannel) Publish(ctx context.Context, exchange, key string, mandatory bool, msg amqp091.Publishing) (Confirmation, error) {
	dc, err := c.PublishWithDeferredConfirmWithContext(ctx, exchange, key, mandatory, false, msg)
	if err != nil {
		return nil, err
	}
	if dc == nil { // not in confirm mode
		return acked{}, nil
	}
	return dc, nil
}

// acked is the confirmation of a publish on a channel without confirms.
type acked struct{}

var closedDone = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (acked) Done() <-chan struct{} { return closedDone }
func (acked) Acked() bool           { return true }

// Acked is a Confirmation that is already positive, for transports that
// store a message as they take it.
func Acked() Confirmation { return acked{} }

var (
	_ Channel      = (*amqpChannel)(nil)
	_ Confirmation = (*amqp091.DeferredConfirmation)(nil)
)
