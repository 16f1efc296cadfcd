package replay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sqlitestore"
)

// Config configures a Responder. Zero values take the defaults.
type Config struct {
	// Pool is a PostgreSQL store (pgstore's schema): it reads history and
	// records requests. Each worker holds one connection for the length of
	// a replay: size the pool above Workers. Set exactly one of Pool and
	// SQLite.
	Pool *pgxpool.Pool
	// SQLite is the embedded store (sqlitestore's schema, migrated): the
	// history is read through its reader pool a page at a time, requests
	// are recorded through its single writer, and cursors are history
	// sequences. Set exactly one of Pool and SQLite.
	SQLite *sqlitestore.DB
	// AMQPURL is the broker: requests are consumed from it, replays published to it.
	AMQPURL string
	// Dial opens the broker connections (one consumes requests, one
	// publishes replays); default broker.AMQPDialer(AMQPURL). The embedded
	// mode passes the in-process broker's.
	Dial broker.Dialer
	// Topology names the exchanges: requests arrive on CommandsExchange,
	// replays go to EventsExchange.
	Topology broker.Topology
	// EntityTypes are the entity types this producer serves; a request for
	// another is refused, and no prefix may equal one of them.
	EntityTypes []string
	// QueueName is the durable request queue, bound to RequestRoutingKey on
	// Topology.CommandsExchange. Requests that can never run go to
	// QueueName+".dead".
	QueueName string
	// Workers bounds the replays running at once. Default 4.
	Workers int
	// Window bounds the unconfirmed publishes of one replay, and so the
	// replayed messages waiting in the consumer's queue (a durable queue
	// confirms a message once it is on disk or acknowledged). Default 1024.
	// It must exceed the batches the consumer applies: a consumer that acks
	// a batch at a time holds every confirm of that batch, so with a window
	// of 64 the catalog's two replay consumers got batches of ~30 events in
	// lockstep with the producer. Measured on loopback, alternating runs:
	// TestReplayThroughputAndBoundedMemory 12.3-13.3k events/s against
	// 10.9-11.7k with 64 (four pairs); with the catalog's larger replay
	// batches (projection.DefaultReplayBatchSize) the S4 rebuild applied
	// batches of ~130 events instead of ~30.
	Window int
	// Heartbeat is how often a running replay proves it is alive. Default 5s.
	Heartbeat time.Duration
	// StaleAfter is how old a running replay's heartbeat may get before
	// another responder takes it over. Default 6 heartbeats.
	StaleAfter time.Duration
	// MaxAttempts bounds the attempts of one replay whose publishing or
	// reading fails (broker restart, database restart); then it is failed.
	// Default 5.
	MaxAttempts int
	// Retention is how long finished requests stay recorded, and so how
	// long a replay_id stays idempotent. Default 7 days.
	Retention time.Duration
	Logger    *slog.Logger
	// Registerer, when set, receives the responder's metrics.
	Registerer prometheus.Registerer
}

func (c *Config) setDefaults() {
	c.Topology = c.Topology.WithDefaults()
	if c.Dial == nil && c.AMQPURL != "" {
		c.Dial = broker.AMQPDialer(c.AMQPURL)
	}
	if c.Workers == 0 {
		c.Workers = 4
	}
	if c.Window == 0 {
		c.Window = 1024
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = 5 * time.Second
	}
	if c.StaleAfter == 0 {
		c.StaleAfter = 6 * c.Heartbeat
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 5
	}
	if c.Retention == 0 {
		c.Retention = 7 * 24 * time.Hour
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports a configuration the responder cannot run with.
func (c Config) Validate() error {
	var errs []error
	switch {
	case c.Pool == nil && c.SQLite == nil:
		errs = append(errs, errors.New("replay: a store is required: set Pool (PostgreSQL) or SQLite"))
	case c.Pool != nil && c.SQLite != nil:
		errs = append(errs, errors.New("replay: set only one store, Pool (PostgreSQL) or SQLite, not both"))
	}
	if c.AMQPURL == "" && c.Dial == nil {
		errs = append(errs, errors.New("replay: AMQPURL or Dial is required"))
	}
	if err := c.Topology.Validate(); err != nil {
		errs = append(errs, err)
	}
	if len(c.EntityTypes) == 0 {
		errs = append(errs, errors.New("replay: EntityTypes is empty"))
	}
	for _, et := range c.EntityTypes {
		if !envelope.ValidName(et) {
			errs = append(errs, fmt.Errorf("replay: entity type %q is not a routing-key word", et))
		}
	}
	if c.QueueName == "" {
		errs = append(errs, errors.New("replay: QueueName is required"))
	}
	if c.Workers < 0 || c.Window < 0 || c.MaxAttempts < 0 || c.Heartbeat < 0 || c.StaleAfter < 0 || c.Retention < 0 {
		errs = append(errs, errors.New("replay: sizes and durations must not be negative"))
	}
	// A worker holds one connection for its snapshot and needs another to
	// record progress: with no connection to spare, all could wait forever.
	if c.Pool != nil && c.Workers > 0 && int(c.Pool.Config().MaxConns) <= c.Workers {
		errs = append(errs, fmt.Errorf("replay: the pool has %d connections; Workers (%d) must be fewer",
			c.Pool.Config().MaxConns, c.Workers))
	}
	if c.StaleAfter > 0 && c.Heartbeat > 0 && c.StaleAfter <= c.Heartbeat {
		errs = append(errs, errors.New("replay: StaleAfter must be longer than Heartbeat"))
	}
	return errors.Join(errs...)
}

// Responder answers replay requests (DESIGN §6). Submit (HTTP) and the AMQP
// request queue record a request and hand it to a bounded pool of workers;
// each worker streams the history of one replay from one consistent read
// (PostgreSQL: a read-only REPEATABLE READ snapshot; SQLite: the rows up to
// a sequence) to the events exchange under the request's prefix.
type Responder struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics

	// requests and history are the configured store's.
	requests requestStore
	history  historySource

	// queue feeds the workers; queued keeps one entry per replay id in it.
	queue    chan string
	queuedMu sync.Mutex
	queued   map[string]bool

	running   atomic.Bool
	ready     chan struct{}
	readyOnce sync.Once

	pubMu   sync.Mutex
	pubConn broker.Conn
}

// queueCapacity bounds the ids waiting for a worker in memory; the recorded
// table holds the rest, and the sweep feeds them in later.
const queueCapacity = 1024

// NewResponder checks cfg and returns a Responder; Run starts it.
func NewResponder(cfg Config) (*Responder, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	r := &Responder{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "replay", "queue", cfg.QueueName),
		metrics: m,
		queue:   make(chan string, queueCapacity),
		queued:  map[string]bool{},
		ready:   make(chan struct{}),
	}
	if cfg.SQLite != nil {
		s := embedded{db: cfg.SQLite}
		r.requests, r.history = s, s
	} else {
		p := postgres{pool: cfg.Pool}
		r.requests, r.history = p, p
	}
	return r, nil
}

// Ready is closed once the request queue is declared and consumed the first
// time: from then on a request published to the commands exchange is kept.
func (r *Responder) Ready() <-chan struct{} { return r.ready }

// Run consumes requests, runs the worker pool and resumes unfinished
// requests until ctx is done. Replays cut short by the stop are recorded as
// pending again, and the next start resumes them. It returns nil on a clean
// stop.
func (r *Responder) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("replay: Run called twice")
	}
	defer r.closePublisherConn()
	g, gctx := errgroup.WithContext(ctx)
	for range r.cfg.Workers {
		g.Go(func() error { r.work(gctx); return nil })
	}
	g.Go(func() error { r.sweepLoop(gctx); return nil })
	g.Go(func() error { r.consumeLoop(gctx); return nil })
	return g.Wait()
}

// enqueue hands a replay id to the workers without blocking: when the
// queue is full the id stays recorded and a later sweep brings it back.
func (r *Responder) enqueue(id string) {
	r.queuedMu.Lock()
	defer r.queuedMu.Unlock()
	if r.queued[id] {
		return
	}
	select {
	case r.queue <- id:
		r.queued[id] = true
	default:
	}
}

func (r *Responder) dequeued(id string) {
	r.queuedMu.Lock()
	delete(r.queued, id)
	r.queuedMu.Unlock()
}

func (r *Responder) work(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case id := <-r.queue:
			r.dequeued(id)
			r.runRequest(ctx, id)
		}
	}
}

// sweepLoop feeds the workers what is recorded but not running: requests
// left by a stopped or crashed responder, and those the in-memory queue had
// no room for. It runs at start and then a few times per StaleAfter, and
// forgets finished requests older than Retention.
func (r *Responder) sweepLoop(ctx context.Context) {
	interval := r.cfg.StaleAfter / 3
	for {
		ids, err := r.claimable(ctx, queueCapacity)
		if err != nil && ctx.Err() == nil {
			r.log.Warn("replay: looking for unfinished requests failed", "err", err)
		}
		for _, id := range ids {
			r.enqueue(id)
		}
		if n, err := r.prune(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("replay: pruning finished requests failed", "err", err)
		} else if n > 0 {
			r.log.Debug("replay: pruned finished requests", "rows", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// sleep waits d or until ctx is done, reporting whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// backoff returns the wait before attempt n+1 (n ≥ 1): doubling from base, capped.
func backoff(n int, base, ceiling time.Duration) time.Duration {
	d := base
	for i := 1; i < n && d < ceiling; i++ {
		d *= 2
	}
	return min(d, ceiling)
}
