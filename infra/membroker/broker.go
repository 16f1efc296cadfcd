package membroker

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	"sync"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

// Broker is an in-process broker. It is safe for concurrent use; every
// goroutine it starts ends when the connection it serves closes, and Close
// closes them all.
type Broker struct {
	cfg Config
	log *slog.Logger

	// mu guards the whole state: one lock keeps routing, delivery and
	// acknowledgement atomic with respect to each other, as a single
	// RabbitMQ node appears to a client. Nothing blocks while holding it.
	mu        sync.Mutex
	closed    bool
	exchanges map[string]*exchange
	queues    map[string]*queue
	conns     map[*conn]struct{}
	ctagSeq   uint64
}

// New returns a running broker with the predeclared exchanges amq.direct,
// amq.fanout and amq.topic.
func New(cfg Config) (*Broker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	b := &Broker{
		cfg:       cfg,
		log:       cfg.Logger,
		exchanges: map[string]*exchange{},
		queues:    map[string]*queue{},
		conns:     map[*conn]struct{}{},
	}
	for name, kind := range map[string]string{"amq.direct": amqp091.ExchangeDirect, "amq.fanout": amqp091.ExchangeFanout, "amq.topic": amqp091.ExchangeTopic} {
		b.exchanges[name] = newExchange(name, kind, true, false, false, nil, "", false)
		b.exchanges[name].system = true
	}
	return b, nil
}

// Dial opens a connection; name is kept for error messages, as RabbitMQ's
// connection_name is for its tools.
func (b *Broker) Dial(name string) (broker.Conn, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("membroker: dial %s: %w", name, ErrBrokerClosed)
	}
	c := newConn(b, name)
	b.conns[c] = struct{}{}
	return c, nil
}

// Dialer returns Dial as a broker.Dialer.
func (b *Broker) Dialer() broker.Dialer { return b.Dial }

// Close closes every connection as a broker shutting down does (their
// NotifyClose receivers get 320 CONNECTION_FORCED), drops every message and
// waits for the delivery goroutines to end. Dial fails afterwards.
func (b *Broker) Close() error {
	var fx effects
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	e := exception(amqp091.ConnectionForced, "broker forced connection closure with reason 'shutdown'")
	for c := range b.conns {
		c.closeLocked(e, &fx)
	}
	for _, q := range b.queues {
		q.disarmExpiry()
	}
	clear(b.queues)
	clear(b.exchanges)
	b.mu.Unlock()
	fx.run()
	return nil
}

// effects collects what an operation must do once b.mu is released:
// blocking sends to notification receivers and waits for delivery
// goroutines, which must never happen under the lock.
type effects []func()

func (fx *effects) add(f func()) { *fx = append(*fx, f) }

func (fx effects) run() {
	for _, f := range fx {
		f()
	}
}

// serverNamedLocked returns a fresh name for a queue declared as "", shaped
// like RabbitMQ's.
func (b *Broker) serverNamedLocked() string {
	for {
		buf := make([]byte, 16)
		_, _ = rand.Read(buf)
		name := "amq.gen-" + base64.RawURLEncoding.EncodeToString(buf)
		if _, taken := b.queues[name]; !taken {
			return name
		}
	}
}
