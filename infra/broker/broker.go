// Package broker is statemill's RabbitMQ side: the shared topology (the
// events and commands exchanges, the alternate exchange that keeps
// unroutable messages), the connection, and the event publisher with
// publisher confirms and the message properties of DESIGN §5.
package broker

import (
	"errors"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Topology names the shared exchanges. Tests give each run its own names so
// they can share one broker.
type Topology struct {
	EventsExchange   string // topic exchange every event is published to; default "events"
	CommandsExchange string // topic exchange for commands between services; default "commands"
	// Passive means the topology exists already: a definitions file
	// (rabbitmq/definitions.json) was loaded into the broker, and the
	// services run as users without configure permission on it
	// (AMQP_DECLARE=passive). DeclareShared, the projection worker and the
	// replay responder then only check that their exchanges and queues
	// exist (passive declares, which need no permission) and bind nothing;
	// a missing one is a *MissingError.
	Passive bool
}

// WithDefaults fills in empty names.
func (t Topology) WithDefaults() Topology {
	if t.EventsExchange == "" {
		t.EventsExchange = "events"
	}
	if t.CommandsExchange == "" {
		t.CommandsExchange = "commands"
	}
	return t
}

// Validate reports missing names.
func (t Topology) Validate() error {
	if t.EventsExchange == "" || t.CommandsExchange == "" {
		return errors.New("broker: exchange names must not be empty")
	}
	return nil
}

// UnroutableExchange is the alternate exchange of EventsExchange: RabbitMQ
// drops an unroutable message silently, even under confirms, so it goes here.
func (t Topology) UnroutableExchange() string { return t.EventsExchange + ".unroutable" }

// UnroutableQueue keeps what UnroutableExchange catches, for an operator to see.
func (t Topology) UnroutableQueue() string { return t.EventsExchange + ".unroutable" }

// Values of AMQP_DECLARE, the setting of Topology.Passive.
const (
	DeclareModeDeclare = "declare" // the services declare the topology (the default)
	DeclareModePassive = "passive" // a definitions file declares it; the services check it exists
)

// ParseDeclareMode reads a declare mode (AMQP_DECLARE): "declare" or empty
// (false), or "passive" (true).
func ParseDeclareMode(v string) (passive bool, err error) {
	switch v {
	case "", DeclareModeDeclare:
		return false, nil
	case DeclareModePassive:
		return true, nil
	}
	return false, fmt.Errorf("%q is not a declare mode: want %q (the service declares its exchanges and queues) or %q (they come from the broker's definitions file)",
		v, DeclareModeDeclare, DeclareModePassive)
}

// TopologyFromEnv reads the topology settings every service shares:
// EVENTS_EXCHANGE, COMMANDS_EXCHANGE and AMQP_DECLARE (see ParseDeclareMode).
// Empty names are left for WithDefaults.
func TopologyFromEnv(getenv func(string) string) (Topology, error) {
	passive, err := ParseDeclareMode(getenv("AMQP_DECLARE"))
	if err != nil {
		return Topology{}, fmt.Errorf("AMQP_DECLARE: %w", err)
	}
	return Topology{
		EventsExchange:   getenv("EVENTS_EXCHANGE"),
		CommandsExchange: getenv("COMMANDS_EXCHANGE"),
		Passive:          passive,
	}, nil
}

// MissingError is what a passive declare reports when the exchange or queue
// does not exist.
type MissingError struct {
	Kind string // "exchange" or "queue"
	Name string
	Err  error // the broker's 404 NOT_FOUND
}

func (e *MissingError) Error() string {
	return fmt.Sprintf("broker: %s %q does not exist: with passive declares (AMQP_DECLARE=passive) nothing is declared, "+
		"the broker must have loaded the definitions file (rabbitmq/definitions.json) into this vhost (%v)", e.Kind, e.Name, e.Err)
}

func (e *MissingError) Unwrap() error { return e.Err }

// missing turns a passive declare's 404 into a *MissingError and wraps any
// other error.
func missing(kind, name string, err error) error {
	var ae *amqp091.Error
	if errors.As(err, &ae) && ae.Code == amqp091.NotFound {
		return &MissingError{Kind: kind, Name: name, Err: err}
	}
	return fmt.Errorf("broker: check %s %q: %w", kind, name, err)
}

// CheckExchange declares exchange name passively: it succeeds if the
// exchange exists, whatever its type and arguments, and needs no
// permission. A missing exchange is a *MissingError; like any channel
// exception it closes ch.
func CheckExchange(ch Channel, name string) error {
	if err := ch.ExchangeDeclarePassive(name, amqp091.ExchangeTopic, true, false, false, false, nil); err != nil {
		return missing("exchange", name, err)
	}
	return nil
}

// CheckQueue declares queue name passively, as CheckExchange does an
// exchange, and returns its message and consumer counts.
func CheckQueue(ch Channel, name string) (amqp091.Queue, error) {
	q, err := ch.QueueDeclarePassive(name, true, false, false, false, nil)
	if err != nil {
		return q, missing("queue", name, err)
	}
	return q, nil
}

// DeclareShared declares the shared topology. It is idempotent; the producing
// service runs it at start. With least-privilege users a definitions file
// declares the same objects instead, and t.Passive makes DeclareShared only
// check that they exist (see CheckExchange).
func DeclareShared(ch Channel, t Topology) error {
	if err := t.Validate(); err != nil {
		return err
	}
	if t.Passive {
		if err := CheckExchange(ch, t.UnroutableExchange()); err != nil {
			return err
		}
		if _, err := CheckQueue(ch, t.UnroutableQueue()); err != nil {
			return err
		}
		for _, x := range []string{t.EventsExchange, t.CommandsExchange} {
			if err := CheckExchange(ch, x); err != nil {
				return err
			}
		}
		return nil
	}
	if err := ch.ExchangeDeclare(t.UnroutableExchange(), amqp091.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare %s: %w", t.UnroutableExchange(), err)
	}
	if _, err := ch.QueueDeclare(t.UnroutableQueue(), true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare queue %s: %w", t.UnroutableQueue(), err)
	}
	if err := ch.QueueBind(t.UnroutableQueue(), "", t.UnroutableExchange(), false, nil); err != nil {
		return fmt.Errorf("bind %s: %w", t.UnroutableQueue(), err)
	}
	if err := ch.ExchangeDeclare(t.EventsExchange, amqp091.ExchangeTopic, true, false, false, false,
		amqp091.Table{"alternate-exchange": t.UnroutableExchange()}); err != nil {
		return fmt.Errorf("declare %s: %w", t.EventsExchange, err)
	}
	if err := ch.ExchangeDeclare(t.CommandsExchange, amqp091.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare %s: %w", t.CommandsExchange, err)
	}
	return nil
}

// Connect opens a connection that reconnects with backoff for as long as it
// lives. Publishers and consumers should not share one.
func Connect(url string, logger watermill.LoggerAdapter) (*amqp.ConnectionWrapper, error) {
	return amqp.NewConnection(amqp.ConnectionConfig{
		AmqpURI: url,
		AmqpConfig: &amqp091.Config{
			Heartbeat: 10 * time.Second,
			Locale:    "en_US",
			Dial:      amqp091.DefaultDial(5 * time.Second),
		},
		Reconnect: &amqp.ReconnectConfig{
			BackoffInitialInterval:     200 * time.Millisecond,
			BackoffRandomizationFactor: 0.5,
			BackoffMultiplier:          1.5,
			BackoffMaxInterval:         5 * time.Second,
		},
	}, logger)
}

// WithChannel runs fn on a fresh channel of conn and closes it afterwards.
func WithChannel(conn *amqp.ConnectionWrapper, fn func(ch Channel) error) error {
	if !conn.IsConnected() {
		return errors.New("broker: not connected")
	}
	ch, err := conn.Connection().Channel()
	if err != nil {
		return fmt.Errorf("broker: open channel: %w", err)
	}
	defer ch.Close()
	return fn(WrapAMQPChannel(ch))
}

// passiveExchange is a TopologyBuilder that never redeclares the exchange
// with arguments of its own (that would fail against the alternate-exchange
// argument): it only checks that the exchange exists.
type passiveExchange struct{ amqp.DefaultTopologyBuilder }

func (*passiveExchange) ExchangeDeclare(ch *amqp091.Channel, name string, c amqp.Config) error {
	return ch.ExchangeDeclarePassive(name, c.Exchange.Type, c.Exchange.Durable, c.Exchange.AutoDeleted, c.Exchange.Internal, c.Exchange.NoWait, nil)
}

// PublisherConfig configures an event publisher.
type PublisherConfig struct {
	Exchange string // the topic exchange; topic = routing key
	// Channels is the number of AMQP channels publishes share; each waits for
	// its confirm, so this bounds the messages in flight. Default 4.
	Channels int
}

// NewPublisher returns a Watermill publisher to a topic exchange whose
// topic is the routing key, with persistent messages, publisher confirms,
// and the message id and content type set (Marshaler).
func NewPublisher(conn *amqp.ConnectionWrapper, c PublisherConfig, logger watermill.LoggerAdapter) (*amqp.Publisher, error) {
	if c.Exchange == "" {
		return nil, errors.New("broker: publisher needs an exchange")
	}
	if c.Channels <= 0 {
		c.Channels = 4
	}
	cfg := amqp.NewDurableTopicConfig("", c.Exchange, "")
	cfg.Marshaler = Marshaler{}
	cfg.Publish.ConfirmDelivery = true
	cfg.Publish.ChannelPoolSize = c.Channels
	cfg.TopologyBuilder = &passiveExchange{}
	return amqp.NewPublisherWithConnection(cfg, logger, conn)
}
