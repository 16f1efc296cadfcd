package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/handlers"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/commandbus"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sqlitestore"
	"github.com/statemill/statemill/infra/startup"
	"github.com/statemill/statemill/infra/web"
)

// Deps are what a Service runs on: exactly one store, and a broker.
type Deps struct {
	// Pool is PostgreSQL (New migrates it).
	Pool *pgxpool.Pool
	// SQLite is the embedded store (New migrates it).
	SQLite *sqlitestore.DB
	// Dial connects to the broker. Default broker.AMQPDialer(Config.AMQPURL).
	Dial       broker.Dialer
	Registerer prometheus.Registerer
}

// relay is what the service needs of its outbox relay.
type relay interface {
	outbox.Relay
	Running() <-chan struct{}
}

// Service is the products service: the command handlers on the command
// bus, the outbox relay, the replay responder and the HTTP API. Run serves
// it alone; services/all mounts it beside the other services.
type Service struct {
	log     *slog.Logger
	bus     *commandbus.Bus
	relay   relay
	replays *replay.Responder
	api     *api
	checks  map[string]func(context.Context) error
}

// New migrates the store, declares the shared topology and builds the
// service; nothing runs until Run.
func New(ctx context.Context, cfg Config, deps Deps) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Topology.Validate(); err != nil {
		return nil, err
	}
	if (deps.Pool == nil) == (deps.SQLite == nil) {
		return nil, errors.New("products: exactly one of Deps.Pool and Deps.SQLite is required")
	}
	if deps.Dial == nil {
		deps.Dial = broker.AMQPDialer(cfg.AMQPURL)
	}
	if deps.Registerer == nil {
		deps.Registerer = prometheus.NewRegistry()
	}
	log := cfg.Logger
	wlog := watermill.NewSlogLoggerWithLevelMapping(log, map[slog.Level]slog.Level{slog.LevelInfo: slog.LevelDebug})

	if err := startup.Retry(ctx, log, "migrate", func() error {
		var err error
		if deps.Pool != nil {
			err = pgstore.Migrate(ctx, deps.Pool, pgstore.Framework(), handlers.Migrations())
		} else {
			err = sqlitestore.Migrate(ctx, deps.SQLite, sqlitestore.Framework(), handlers.SQLiteMigrations())
		}
		if apperr.CodeOf(err) != apperr.Unavailable {
			return startup.Permanent(err)
		}
		return err
	}); err != nil {
		return nil, err
	}
	// Only reaching the broker is retried: a refusal (a missing permission,
	// a passive declare that finds nothing, other arguments) will not go away.
	if err := startup.Retry(ctx, log, "declare the broker topology", func() error {
		conn, err := deps.Dial("statemill products topology")
		if err != nil {
			return err
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			return err
		}
		defer ch.Close()
		return startup.Permanent(broker.DeclareShared(ch, cfg.Topology))
	}); err != nil {
		return nil, fmt.Errorf("declare topology: %w", err)
	}

	s := &Service{log: log}
	var repo handlers.Repository
	var ping func(context.Context) error
	var err error
	if deps.Pool != nil {
		repo = handlers.NewPostgresRepository(pgstore.New(deps.Pool, wlog))
		ping = deps.Pool.Ping
		// The pipelined relay publishes a batch with its confirms in flight
		// together: Watermill's forwarder (outbox.NewForwarderRelay, which
		// reads the same tables and offsets) waits for each confirm and
		// drained about 2.2k events/s against PostgreSQL's ~10k commands/s
		// (baselines H12).
		s.relay, err = outbox.NewPipelinedRelay(outbox.PipelinedConfig{
			Pool: deps.Pool, Dial: deps.Dial, Exchange: cfg.Topology.EventsExchange,
			Topic: pgstore.OutboxTopic, Logger: wlog,
		})
	} else {
		repo = handlers.NewSQLiteRepository(sqlitestore.New(deps.SQLite))
		ping = deps.SQLite.Reader().PingContext
		s.relay, err = outbox.NewSequentialRelay(outbox.SequentialConfig{
			Outbox: sqlitestore.NewOutbox(deps.SQLite), Dial: deps.Dial, Exchange: cfg.Topology.EventsExchange, Logger: wlog,
		})
	}
	if err != nil {
		return nil, err
	}
	if err := deps.Registerer.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "statemill", Name: "outbox_pending",
		Help: "Outbox rows committed but not yet published.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		n, err := s.relay.Pending(ctx)
		if err != nil {
			return -1
		}
		return float64(n)
	})); err != nil {
		return nil, err
	}
	for _, c := range handlers.Collectors() {
		if err := deps.Registerer.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			return nil, err
		}
	}

	if s.bus, err = commandbus.NewWithConfig(commandbus.Config{Registerer: deps.Registerer, Logger: wlog}); err != nil {
		return nil, err
	}
	if err := handlers.Register(s.bus, repo); err != nil {
		return nil, err
	}
	s.replays, err = handlers.NewReplayResponder(replay.Config{
		Pool: deps.Pool, SQLite: deps.SQLite, Dial: deps.Dial, Topology: cfg.Topology,
		QueueName: ReplayQueue(cfg.Topology), Logger: log, Registerer: deps.Registerer,
	})
	if err != nil {
		return nil, fmt.Errorf("replay responder: %w", err)
	}
	s.api = &api{bus: s.bus, repo: repo, replays: s.replays}
	s.checks = map[string]func(context.Context) error{
		"store": ping,
		// Not ready until the relay has read the outbox with a broker
		// connection open.
		"relay": func(context.Context) error {
			select {
			case <-s.relay.Running():
				return nil
			default:
				return errors.New("starting")
			}
		},
	}
	return s, nil
}

// Routes adds the products API (/api/...) to r.
func (s *Service) Routes(r *web.Router) { s.api.routes(r) }

// Checks are the service's health checks.
func (s *Service) Checks() map[string]func(context.Context) error { return s.checks }

// Accepting is closed once commands can be taken: a command sent before the
// bus's router runs would find no subscriber and wait out its timeout.
func (s *Service) Accepting() <-chan struct{} { return s.bus.Running() }

// Run runs the command bus, the relay and the replay responder until ctx
// is done or one of them fails. Replays cut short are recorded as pending
// and resume at the next start.
func (s *Service) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	task := func(name string, run func(context.Context) error) {
		g.Go(func() error {
			err := run(gctx)
			if err != nil && !errors.Is(err, context.Canceled) {
				s.log.Error("background task failed; stopping", "task", name, "err", err)
				return fmt.Errorf("%s: %w", name, err)
			}
			return err
		})
	}
	task("command bus", s.bus.Run)
	task("outbox relay", s.relay.Run)
	task("replay responder", s.replays.Run)
	return g.Wait()
}

// Drain stops taking commands and publishes what was committed: call it
// after the HTTP server stopped and before cancelling Run.
func (s *Service) Drain(ctx context.Context) error {
	var errs []error
	if err := s.bus.Close(); err != nil {
		errs = append(errs, fmt.Errorf("command bus: %w", err))
	}
	if err := s.relay.Flush(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
