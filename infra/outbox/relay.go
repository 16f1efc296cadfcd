// Package outbox relays the transactional outbox to the broker: rows that
// command transactions wrote to watermill_outbox are published, in xid order,
// with publisher confirms, then marked done; published rows are pruned after
// a retention period so the table does not grow forever.
//
// Two relays read the same tables and offsets row: ForwarderRelay, Watermill's
// forwarder over watermill-sql, and PipelinedRelay, which publishes a whole
// batch with pipelined confirms before it acknowledges it, and sleeps on
// LISTEN/NOTIFY when idle.
//
// Delivery is at least once: a crash between the broker's confirm
// and the offset update publishes a row again, which version-checked
// consumers absorb.
package outbox

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Config configures a Relay. Zero durations take the defaults.
type Config struct {
	Pool      *pgxpool.Pool
	Publisher message.Publisher // where events go; topic = routing key
	Topic     string            // the outbox topic written by the store (table watermill_<topic>)

	// ConsumerGroup names this relay's offsets row; relays in the same group
	// take turns (the offsets row lock), so several instances are safe.
	ConsumerGroup string // default "relay"
	// PollInterval is how long an idle relay waits before it looks again:
	// an idle event reaches the broker within about this time. Default 10ms.
	PollInterval time.Duration
	// BatchSize is the rows read per query. The batch's transaction holds an
	// xid, and so pg_snapshot_xmin, while it publishes: keep it short. Default 50.
	BatchSize int
	// AckDeadline bounds one row's publish; a row not acked in time is read
	// again. Short, for the same reason as BatchSize. Default 5s.
	AckDeadline time.Duration
	// Retention is how long published rows stay for inspection. Default 1h.
	Retention time.Duration
	// PruneInterval is how often published rows are deleted. Default 1m.
	PruneInterval time.Duration

	Logger watermill.LoggerAdapter
}

func (c *Config) setDefaults() {
	if c.ConsumerGroup == "" {
		c.ConsumerGroup = defaultConsumerGroup
	}
	if c.PollInterval == 0 {
		c.PollInterval = 10 * time.Millisecond
	}
	if c.BatchSize == 0 {
		c.BatchSize = 50
	}
	if c.AckDeadline == 0 {
		c.AckDeadline = 5 * time.Second
	}
	if c.Retention == 0 {
		c.Retention = defaultRetention
	}
	if c.PruneInterval == 0 {
		c.PruneInterval = defaultPruneInterval
	}
	if c.Logger == nil {
		c.Logger = watermill.NopLogger{}
	}
}

// Validate reports a config the relay cannot run with.
func (c Config) Validate() error {
	var errs []error
	if c.Pool == nil {
		errs = append(errs, errors.New("outbox: Pool is required"))
	}
	if c.Publisher == nil {
		errs = append(errs, errors.New("outbox: Publisher is required"))
	}
	if c.Topic == "" {
		errs = append(errs, errors.New("outbox: Topic is required"))
	}
	if c.PollInterval < 0 || c.AckDeadline < 0 || c.Retention < 0 || c.PruneInterval < 0 || c.BatchSize < 0 {
		errs = append(errs, errors.New("outbox: durations and sizes must not be negative"))
	}
	return errors.Join(errs...)
}

// Relay moves committed outbox rows to the broker. ForwarderRelay and
// PipelinedRelay are the PostgreSQL implementations; they read the same
// tables and offsets row, so a deployment can switch between them.
type Relay interface {
	// Run relays until ctx is done or Close is called.
	Run(ctx context.Context) error
	// Pending counts rows committed but not yet published.
	Pending(ctx context.Context) (int64, error)
	// Flush waits until every row committed so far is published.
	Flush(ctx context.Context) error
	Close() error
}

var _ Relay = (*ForwarderRelay)(nil)

// ForwarderRelay is Watermill's forwarder over watermill-sql's PostgreSQL
// subscriber.
type ForwarderRelay struct {
	config Config
	tables outboxTable

	running     chan struct{} // closed once a forwarder first runs
	runningOnce sync.Once
	closeOnce   sync.Once
	closed      chan struct{}
}

// NewForwarderRelay builds a relay. The outbox tables must exist (migrations).
func NewForwarderRelay(c Config) (*ForwarderRelay, error) {
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	r := &ForwarderRelay{
		config:  c,
		tables:  newOutboxTable(c.Pool, c.Topic, c.ConsumerGroup, c.Retention, c.PruneInterval, c.Logger),
		running: make(chan struct{}),
		closed:  make(chan struct{}),
	}
	if _, err := r.newForwarder(); err != nil { // fail fast on a config Watermill refuses
		return nil, err
	}
	return r, nil
}

func (r *ForwarderRelay) newForwarder() (*forwarder.Forwarder, error) {
	c := r.config
	ackDeadline := c.AckDeadline
	sub, err := wsql.NewSubscriber(wsql.BeginnerFromPgx(c.Pool), wsql.SubscriberConfig{
		ConsumerGroup:  c.ConsumerGroup,
		AckDeadline:    &ackDeadline,
		PollInterval:   c.PollInterval,
		ResendInterval: 200 * time.Millisecond,
		RetryInterval:  500 * time.Millisecond,
		SchemaAdapter:  wsql.DefaultPostgreSQLSchema{SubscribeBatchSize: c.BatchSize},
		OffsetsAdapter: wsql.DefaultPostgreSQLOffsetsAdapter{},
	}, c.Logger)
	if err != nil {
		return nil, fmt.Errorf("outbox: subscriber: %w", err)
	}
	fwd, err := forwarder.NewForwarder(sub, c.Publisher, c.Logger, forwarder.Config{
		ForwarderTopic: c.Topic,
		CloseTimeout:   10 * time.Second,
		// A row that is not an envelope can never be published; retrying
		// it would stall the outbox forever. It is logged and skipped.
		AckWhenCannotUnwrap: true,
	})
	if err != nil {
		return nil, fmt.Errorf("outbox: forwarder: %w", err)
	}
	return fwd, nil
}

// Run relays and prunes until ctx is done or Close is called. A forwarder
// that stops (its subscription fails while PostgreSQL is down) is replaced
// after a backoff: the relay outlives database outages.
func (r *ForwarderRelay) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	pruned := make(chan struct{})
	go func() {
		defer close(pruned)
		r.tables.pruneLoop(ctx)
	}()
	defer func() { <-pruned }()
	wait := 200 * time.Millisecond
	for {
		fwd, err := r.newForwarder()
		if err == nil {
			go func() {
				select {
				case <-fwd.Running():
					r.runningOnce.Do(func() { close(r.running) })
				case <-ctx.Done():
				}
			}()
			err = fwd.Run(ctx)
		}
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("forwarder stopped")
		}
		r.config.Logger.Error("outbox relay stopped; restarting", err, watermill.LogFields{"in": wait.String()})
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// Running is closed once the relay has first subscribed to the outbox.
func (r *ForwarderRelay) Running() <-chan struct{} { return r.running }

// Close stops Run.
func (r *ForwarderRelay) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

// Pending counts rows not yet published.
func (r *ForwarderRelay) Pending(ctx context.Context) (int64, error) { return r.tables.pending(ctx) }

// Flush waits until every row committed so far is published, or ctx ends.
func (r *ForwarderRelay) Flush(ctx context.Context) error {
	return r.tables.flush(ctx, r.config.PollInterval+10*time.Millisecond, nil)
}

// Prune deletes published rows older than the retention (see outboxTable.prune).
func (r *ForwarderRelay) Prune(ctx context.Context) (int64, error) { return r.tables.prune(ctx) }
