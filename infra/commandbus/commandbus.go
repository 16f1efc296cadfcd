// Package commandbus is the in-process command bus: Watermill CQRS over a
// GoChannel with request/reply, so an HTTP handler sends a command and gets
// its outcome (a result or a coded *apperr.Error) back. In process it is fast
// and free of the AMQP reply-queue pitfalls; command errors are acked and
// never redelivered.
package commandbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/components/cqrs"
	"github.com/ThreeDotsLabs/watermill/components/metrics"
	"github.com/ThreeDotsLabs/watermill/components/requestreply"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	gojson "github.com/goccy/go-json"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
)

// Config configures a Bus.
type Config struct {
	// Timeout bounds one command from send to reply. Default 15s.
	Timeout time.Duration
	// CloseTimeout is how long Close waits for commands in flight. Default 30s.
	CloseTimeout time.Duration
	// Registerer, when set, receives Watermill's router metrics.
	Registerer prometheus.Registerer
	Logger     watermill.LoggerAdapter
}

func (c *Config) setDefaults() {
	if c.Timeout == 0 {
		c.Timeout = 15 * time.Second
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = watermill.NopLogger{}
	}
}

// Validate reports a config the bus cannot run with.
func (c Config) Validate() error {
	if c.Timeout < 0 || c.CloseTimeout < 0 {
		return errors.New("commandbus: timeouts must not be negative")
	}
	return nil
}

// Bus sends commands to their handlers and carries the replies back.
type Bus struct {
	config    Config
	pubsub    *gochannel.GoChannel
	replies   *gochannel.GoChannel // apart from pubsub: the router closes pubsub on Close, before commands in flight reply
	router    *message.Router
	bus       *cqrs.CommandBus
	processor *cqrs.CommandProcessor
}

var marshaler = fastJSONMarshaler{cqrs.JSONMarshaler{GenerateName: cqrs.StructName}}

// fastJSONMarshaler is Watermill's cqrs.JSONMarshaler (same payload, name
// and metadata) encoding with goccy/go-json: every command and its reply
// cross the bus as JSON, and encoding/json's share of a write service's CPU
// under a command load was about 9%.
type fastJSONMarshaler struct{ cqrs.JSONMarshaler }

func (m fastJSONMarshaler) Marshal(v any) (*message.Message, error) {
	b, err := gojson.Marshal(v)
	if err != nil {
		return nil, err
	}
	msg := message.NewMessage(watermill.NewUUID(), b)
	msg.Metadata.Set("name", m.Name(v))
	return msg, nil
}

func (fastJSONMarshaler) Unmarshal(msg *message.Message, v any) error {
	return gojson.Unmarshal(msg.Payload, v)
}

// NewWithConfig builds a bus. Register handlers with Handle, then Run it.
func NewWithConfig(c Config) (*Bus, error) {
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	// PreserveContext carries the caller's deadline and values (the
	// correlation id) to the handler: both sides live in this process.
	pubsub := gochannel.NewGoChannel(gochannel.Config{PreserveContext: true}, c.Logger)
	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: c.CloseTimeout}, c.Logger)
	if err != nil {
		return nil, fmt.Errorf("commandbus: router: %w", err)
	}
	// GoChannel hands a subscriber its next message only after the previous
	// one is acked; acking at once lets commands run concurrently. Nothing
	// is lost: the caller waits for the reply, not for the ack.
	router.AddMiddleware(middleware.InstantAck)
	if c.Registerer != nil {
		metrics.NewPrometheusMetricsBuilder(c.Registerer, "statemill", "commands").AddPrometheusRouterMetrics(router)
	}
	bus, err := cqrs.NewCommandBusWithConfig(pubsub, cqrs.CommandBusConfig{
		GeneratePublishTopic: func(p cqrs.CommandBusGeneratePublishTopicParams) (string, error) {
			return "cmd." + p.CommandName, nil
		},
		OnSend: func(p cqrs.CommandBusOnSendParams) error {
			if id := envelope.CorrelationID(p.Message.Context()); id != "" {
				middleware.SetCorrelationID(id, p.Message)
			}
			return nil
		},
		Marshaler: marshaler,
		Logger:    c.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("commandbus: bus: %w", err)
	}
	processor, err := cqrs.NewCommandProcessorWithConfig(router, cqrs.CommandProcessorConfig{
		GenerateSubscribeTopic: func(p cqrs.CommandProcessorGenerateSubscribeTopicParams) (string, error) {
			return "cmd." + p.CommandName, nil
		},
		SubscriberConstructor: func(cqrs.CommandProcessorSubscriberConstructorParams) (message.Subscriber, error) {
			return pubsub, nil
		},
		Marshaler: marshaler,
		Logger:    c.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("commandbus: processor: %w", err)
	}
	// A reply is published only once its caller has taken it, so that Close,
	// which closes replies after the last handler returned, cannot drop it.
	replies := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, c.Logger)
	return &Bus{config: c, pubsub: pubsub, replies: replies, router: router, bus: bus, processor: processor}, nil
}

// Run processes commands until ctx is done or Close is called.
func (b *Bus) Run(ctx context.Context) error { return b.router.Run(ctx) }

// Running is closed once the bus processes commands.
func (b *Bus) Running() chan struct{} { return b.router.Running() }

// Close stops taking commands and waits for those in flight; their callers
// still get their replies.
func (b *Bus) Close() error { return errors.Join(b.router.Close(), b.replies.Close()) }

// Handle registers fn as the handler of commands of type C. A panic in fn
// becomes an Internal error reply instead of leaving the caller waiting.
func Handle[C any, R any](b *Bus, fn func(ctx context.Context, cmd *C) (R, error)) error {
	be, err := backend[R](b)
	if err != nil {
		return err
	}
	name := cqrs.StructName(new(C))
	h := requestreply.NewCommandHandlerWithResult(name, be, func(ctx context.Context, cmd *C) (res R, err error) {
		defer func() {
			if p := recover(); p != nil {
				err = apperr.Wrap(apperr.Internal, fmt.Errorf("panic: %v\n%s", p, debug.Stack()), "internal error")
			}
			if code := apperr.CodeOf(err); code == apperr.Internal || code == apperr.Unavailable {
				b.config.Logger.Error("command failed", err, watermill.LogFields{
					"command": name, "correlation_id": envelope.CorrelationID(ctx)})
			}
		}()
		return fn(ctx, cmd)
	})
	if err := addHandler(b.processor, h); err != nil {
		return fmt.Errorf("commandbus: register %s: %w", name, err)
	}
	return nil
}

// addHandler registers h, turning the router's panic on a duplicate handler
// name (a second handler for the same command name) into an error. The
// router panics before it changes any state.
func addHandler(p *cqrs.CommandProcessor, h cqrs.CommandHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			if e, ok := r.(error); ok {
				err = e
			} else {
				err = fmt.Errorf("%v", r)
			}
		}
	}()
	return p.AddHandlers(h)
}

// Send sends cmd and waits for its handler's outcome. The error, if any, is
// an *apperr.Error with the handler's code.
func Send[R any, C any](ctx context.Context, b *Bus, cmd *C) (R, error) {
	var zero R
	be, err := backend[R](b)
	if err != nil {
		return zero, err
	}
	ctx, cancel := context.WithTimeout(ctx, b.config.Timeout)
	defer cancel()
	reply, err := requestreply.SendWithReply[R](ctx, b.bus, be, cmd)
	if err != nil {
		if ctx.Err() != nil {
			return zero, apperr.Wrap(apperr.Unavailable, err, "the command timed out; retry later")
		}
		return zero, fmt.Errorf("commandbus: send %T: %w", cmd, err)
	}
	if reply.Error != nil {
		return zero, reply.Error
	}
	return reply.HandlerResult, nil
}

func backend[R any](b *Bus) (*requestreply.PubSubBackend[R], error) {
	timeout := b.config.Timeout
	topic := func(p requestreply.PubSubBackendSubscribeParams) (string, error) {
		return "reply." + string(p.OperationID), nil
	}
	be, err := requestreply.NewPubSubBackend[R](requestreply.PubSubBackendConfig{
		Publisher: b.replies,
		SubscriberConstructor: func(requestreply.PubSubBackendSubscribeParams) (message.Subscriber, error) {
			return b.replies, nil
		},
		GenerateSubscribeTopic: topic,
		GeneratePublishTopic: func(p requestreply.PubSubBackendPublishParams) (string, error) {
			return "reply." + string(p.OperationID), nil
		},
		ListenForReplyTimeout: &timeout,
		AckCommandErrors:      true,
		Logger:                b.config.Logger,
	}, replyMarshaler[R]{})
	if err != nil {
		return nil, fmt.Errorf("commandbus: backend: %w", err)
	}
	return be, nil
}

// replyMarshaler keeps the error's code and fields across the bus; Watermill's
// JSON marshaler would turn it into a bare string.
type replyMarshaler[R any] struct{}

const errorMetadataKey = "statemill_error"

func (replyMarshaler[R]) MarshalReply(p requestreply.BackendOnCommandProcessedParams[R]) (*message.Message, error) {
	body, err := gojson.Marshal(p.HandlerResult)
	if err != nil {
		return nil, fmt.Errorf("marshal reply: %w", err)
	}
	msg := message.NewMessage(watermill.NewUUID(), body)
	if p.HandleErr != nil {
		e, err := json.Marshal(apperr.As(p.HandleErr))
		if err != nil {
			return nil, fmt.Errorf("marshal reply error: %w", err)
		}
		msg.Metadata.Set(errorMetadataKey, string(e))
	}
	return msg, nil
}

func (replyMarshaler[R]) UnmarshalReply(msg *message.Message) (requestreply.Reply[R], error) {
	var reply requestreply.Reply[R]
	if err := gojson.Unmarshal(msg.Payload, &reply.HandlerResult); err != nil {
		return reply, fmt.Errorf("unmarshal reply: %w", err)
	}
	if raw := msg.Metadata.Get(errorMetadataKey); raw != "" {
		e := new(apperr.Error)
		if err := json.Unmarshal([]byte(raw), e); err != nil {
			return reply, fmt.Errorf("unmarshal reply error: %w", err)
		}
		reply.Error = e
	}
	return reply, nil
}
