package projection

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// Defaults of Config.
const (
	DefaultPrefetch  = 200
	DefaultBatchSize = 100
	// A live batch's wait for more deliveries is latency: at 650 events/s
	// (the benchmark's S3, commit → applied), 1ms against 5ms gave p50
	// 8-12 against 11-20 ms and p99 medians 76 and 35 against 117 and 56
	// ms, alternated twice; under a heavier load deliveries wait in the
	// prefetch while a batch applies, so batches still fill.
	DefaultBatchDelay     = 1 * time.Millisecond
	DefaultRebuildTimeout = 10 * time.Minute

	// A replay is throughput, not latency: larger and longer batches cost
	// the read model fewer commits per event. Measured by the benchmark's
	// S4 (a rebuild of 300k events, 2 vCPUs, three alternating pairs, with
	// the replay responder's window raised to 1024): batches grew from ~30
	// to ~130 events and the CPU per event of the database, the worker and
	// the replay responder together fell from 134-184 to 112-114 µs.
	DefaultReplayPrefetch   = 1000
	DefaultReplayBatchSize  = 500
	DefaultReplayBatchDelay = 20 * time.Millisecond

	// DefaultReplayEventsPerMessage is the batch a worker asks its replays
	// for. One message per event left RabbitMQ the limit of a rebuild (about
	// 100 µs of broker CPU per persistent, confirmed message on 2 vCPUs);
	// a hundred events of ~0.5 KB make a message of ~50 KB.
	DefaultReplayEventsPerMessage = 100
)

// StateTable is the table, in Config.Schema, where the runtime keeps each
// projection's generations, rebuild state and replay cursors (one row per
// worker name). ProgressTable counts the events applied per generation.
const (
	StateTable    = "projection_state"
	ProgressTable = "projection_progress"
)

// namePattern is the shape of a worker name: it is also the replay prefix of
// the worker, so it follows the prefix rule of DESIGN §6.
var namePattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,39}$`)

// Config configures a Worker.
type Config struct {
	// Name is the worker's name N: its queues are N.live, N.replay and
	// N.dead, and N is the prefix its replays are published under. It must
	// match ^[a-z][a-z0-9-]{0,39}$ and not be an entity type or a word the
	// routing scheme uses.
	Name string
	// EntityTypes are the entity types the projection consumes.
	EntityTypes []string
	// Projection writes the read model.
	Projection Projection
	// Pool is the read model's database. The worker uses up to two
	// connections of it at a time (live and replay batches) and opens one
	// more of its own, outside the pool, to hold the rebuild lock.
	Pool *pgxpool.Pool
	// AMQPURL is the broker.
	AMQPURL string
	// Dial opens the worker's broker connection, and again after it is
	// lost; default broker.AMQPDialer(AMQPURL). The embedded mode passes
	// the in-process broker's.
	Dial broker.Dialer
	// Topology names the shared exchanges (defaults filled in).
	Topology broker.Topology
	// Schema is the PostgreSQL schema of StateTable and ProgressTable;
	// default Name. The worker creates both if they are missing.
	Schema string
	// Prefetch is the consumer prefetch of each queue; default 200.
	Prefetch int
	// BatchSize is the most events applied in one transaction; default 100.
	BatchSize int
	// BatchDelay is how long a batch waits for more deliveries after its
	// first one; default 1ms.
	BatchDelay time.Duration
	// ReplayPrefetch, ReplayBatchSize and ReplayBatchDelay are the same
	// for each consumer of N.replay during a rebuild or catch-up, counted
	// in events; defaults 1000, 500 and 20ms. The replay producer's confirm
	// window (replay.Config Window) bounds the messages these consumers can
	// get at once.
	ReplayPrefetch   int
	ReplayBatchSize  int
	ReplayBatchDelay time.Duration
	// ReplayEventsPerMessage is the most events the worker asks the
	// producer to put in one replay message (replay.Request Batch); default
	// 100, at most replay.MaxBatch; 1 asks for one message per event.
	ReplayEventsPerMessage int
	// RebuildTimeout bounds a rebuild or catch-up from its request to its
	// swap; default 10 minutes.
	RebuildTimeout time.Duration
	// RebuildOnFirstStart starts a rebuild as soon as the worker consumes,
	// when its state row did not exist before this start (a new projection
	// fills itself from history).
	RebuildOnFirstStart bool
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registerer receives the worker's metrics; nil means
	// prometheus.DefaultRegisterer. Registering twice (several workers in
	// one process) shares the collectors; series are labelled by name.
	Registerer prometheus.Registerer
}

// withDefaults returns c with the empty fields filled in.
func (c Config) withDefaults() Config {
	c.Topology = c.Topology.WithDefaults()
	if c.Dial == nil && c.AMQPURL != "" {
		c.Dial = broker.AMQPDialer(c.AMQPURL)
	}
	if c.Schema == "" {
		c.Schema = c.Name
	}
	if c.Prefetch <= 0 {
		c.Prefetch = DefaultPrefetch
	}
	if c.BatchSize <= 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.BatchDelay <= 0 {
		c.BatchDelay = DefaultBatchDelay
	}
	if c.ReplayPrefetch <= 0 {
		c.ReplayPrefetch = DefaultReplayPrefetch
	}
	if c.ReplayBatchSize <= 0 {
		c.ReplayBatchSize = DefaultReplayBatchSize
	}
	if c.ReplayBatchDelay <= 0 {
		c.ReplayBatchDelay = DefaultReplayBatchDelay
	}
	if c.ReplayEventsPerMessage <= 0 {
		c.ReplayEventsPerMessage = DefaultReplayEventsPerMessage
	}
	if c.RebuildTimeout <= 0 {
		c.RebuildTimeout = DefaultRebuildTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.DefaultRegisterer
	}
	return c
}

// Validate reports what is missing or wrong, as an apperr.Invalid error with
// one message per field. Zero values that have defaults are fine.
func (c Config) Validate() error {
	c = c.withDefaults()
	f := apperr.Fields{}
	if len(c.EntityTypes) == 0 {
		f.Add("entity_types", "at least one entity type is needed")
	}
	for _, et := range c.EntityTypes {
		if !envelope.ValidName(et) {
			f.Add("entity_types", fmt.Sprintf("%q is not a valid entity type", et))
		}
	}
	if !namePattern.MatchString(c.Name) {
		f.Add("name", fmt.Sprintf("%q must match %s", c.Name, namePattern))
	} else if len(c.EntityTypes) > 0 {
		// The name is the replay prefix: check it the way the producer will.
		r := replay.Request{Prefix: c.Name, EntityType: c.EntityTypes[0]}
		if err := r.Normalize(c.EntityTypes); err != nil {
			var ae *apperr.Error
			if errors.As(err, &ae) && ae.Fields["prefix"] != "" {
				f.Add("name", ae.Fields["prefix"])
			}
		}
	}
	if c.ReplayEventsPerMessage > replay.MaxBatch {
		f.Add("replay_events_per_message", fmt.Sprintf("must be at most %d", replay.MaxBatch))
	}
	if c.Projection == nil {
		f.Add("projection", "is required")
	}
	if c.Pool == nil {
		f.Add("pool", "is required")
	}
	if c.Dial == nil {
		f.Add("amqp_url", "is required (or Dial)")
	}
	if err := c.Topology.Validate(); err != nil {
		f.Add("topology", err.Error())
	}
	if c.Schema == "" {
		f.Add("schema", "is required")
	}
	if c.BatchSize > c.Prefetch {
		f.Add("batch_size", "must not exceed the prefetch, or a batch never fills")
	}
	if c.ReplayBatchSize > c.ReplayPrefetch {
		f.Add("replay_batch_size", "must not exceed the replay prefetch, or a batch never fills")
	}
	if slices.ContainsFunc(c.EntityTypes, func(et string) bool { return et == c.Name }) {
		f.Add("name", "must not be one of the entity types")
	}
	return f.Err()
}

// ActiveGenerationSQL returns a scalar subquery that yields the active
// generation of the projection worker named name whose state lives in schema,
// for readers to filter on:
//
//	SELECT ... FROM catalog.items WHERE generation = <ActiveGenerationSQL("catalog", "catalog")>
//
// The swap of a rebuild changes it in one transaction, so a statement always
// reads one complete generation. It panics when name is not a valid worker
// name (a programming error; the name is also quoted as a literal).
func ActiveGenerationSQL(schema, name string) string {
	if !namePattern.MatchString(name) {
		panic(fmt.Sprintf("projection: invalid worker name %q", name))
	}
	return "(SELECT active_generation FROM " + table(schema, StateTable) + " WHERE name = '" + name + "')"
}

// table is the quoted, schema-qualified name of a runtime table.
func table(schema, name string) string { return pgx.Identifier{schema, name}.Sanitize() }
