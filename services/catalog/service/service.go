package service

import (
	"context"
	"errors"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/startup"
	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/catalog"
)

// Deps are what a Service runs on.
type Deps struct {
	// Pool is the read model's PostgreSQL database (New migrates it). Nil
	// keeps the catalog in memory, filled by a latest replay at every start
	// (the embedded mode: nothing to keep that the history cannot rebuild).
	Pool *pgxpool.Pool
	// Dial connects to the broker. Default broker.AMQPDialer(Config.AMQPURL).
	Dial       broker.Dialer
	Registerer prometheus.Registerer
}

// Service is the catalog: its read model, the runtime that keeps it, and
// its HTTP API. Run serves it alone; services/all mounts it beside the
// other services in one process.
type Service struct {
	log     *slog.Logger
	api     *api
	run     func(context.Context) error
	ready   <-chan struct{}
	checks  map[string]func(context.Context) error
	rebuild func(context.Context) (string, error)
}

// New builds the catalog on deps; nothing runs until Run.
func New(ctx context.Context, cfg Config, deps Deps) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Topology.Validate(); err != nil {
		return nil, err
	}
	if deps.Dial == nil {
		deps.Dial = broker.AMQPDialer(cfg.AMQPURL)
	}
	if deps.Registerer == nil {
		deps.Registerer = prometheus.NewRegistry()
	}
	if deps.Pool == nil {
		return newInMemory(cfg, deps)
	}
	return newOnPostgres(ctx, cfg, deps)
}

func newOnPostgres(ctx context.Context, cfg Config, deps Deps) (*Service, error) {
	log := cfg.Logger
	if err := startup.Retry(ctx, log, "migrate", func() error {
		err := pgstore.Migrate(ctx, deps.Pool, catalog.Migrations())
		if apperr.CodeOf(err) != apperr.Unavailable {
			return startup.Permanent(err)
		}
		return err
	}); err != nil {
		return nil, err
	}
	if err := deps.Registerer.Register(catalog.Collectors()[0]); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
		return nil, err
	}
	proj := catalog.NewProjection(log)
	worker, err := projection.NewWorker(projection.Config{
		Name:                cfg.Name,
		EntityTypes:         []string{events.EntityType},
		Projection:          proj,
		Pool:                deps.Pool,
		Dial:                deps.Dial,
		Topology:            cfg.Topology,
		Schema:              catalog.Schema,
		RebuildTimeout:      cfg.RebuildTimeout,
		RebuildOnFirstStart: true,
		Logger:              log,
		Registerer:          deps.Registerer,
	})
	if err != nil {
		return nil, err
	}
	return &Service{
		log: log,
		api: &api{
			queries: catalog.NewReader(deps.Pool, cfg.Name),
			status: func(ctx context.Context) (any, error) {
				st, err := worker.Status(ctx)
				return workerStatus{Status: st, IllegalTransitions: proj.IllegalTransitions()}, err
			},
			rebuild: worker.Rebuild,
		},
		run:     worker.Run,
		ready:   worker.Ready(),
		rebuild: worker.Rebuild,
		checks: map[string]func(context.Context) error{
			"postgres": deps.Pool.Ping,
			"worker":   readyCheck(worker.Ready(), "not consuming yet"),
		},
	}, nil
}

func newInMemory(cfg Config, deps Deps) (*Service, error) {
	log := cfg.Logger
	model := catalog.NewMemory(log)
	view, err := projection.NewView(projection.ViewConfig{
		Prefix:      cfg.Name,
		EntityTypes: []string{events.EntityType},
		Projection:  model,
		Dial:        deps.Dial,
		Topology:    cfg.Topology,
		Logger:      log,
	})
	if err != nil {
		return nil, err
	}
	rebuild := func(ctx context.Context) (string, error) { return view.Refresh(ctx) }
	return &Service{
		log: log,
		api: &api{
			queries: model,
			status: func(context.Context) (any, error) {
				return viewStatus{ViewStatus: view.Status(), IllegalTransitions: model.IllegalTransitions()}, nil
			},
			rebuild: rebuild,
		},
		run:     view.Run,
		ready:   view.Ready(),
		rebuild: rebuild,
		checks: map[string]func(context.Context) error{
			"view": func(context.Context) error {
				if st := view.Status(); !st.Connected || st.Replaying {
					return errors.New("replaying")
				}
				return nil
			},
		},
	}, nil
}

// workerStatus is GET /catalog/status of the PostgreSQL catalog.
type workerStatus struct {
	projection.Status
	IllegalTransitions int64 `json:"illegal_transitions"`
}

// viewStatus is GET /catalog/status of the in-memory catalog.
type viewStatus struct {
	projection.ViewStatus
	IllegalTransitions int64 `json:"illegal_transitions"`
}

func readyCheck(ready <-chan struct{}, notYet string) func(context.Context) error {
	return func(context.Context) error {
		select {
		case <-ready:
			return nil
		default:
			return errors.New(notYet)
		}
	}
}

// Routes adds the catalog's API (/catalog/...) to r.
func (s *Service) Routes(r *web.Router) { s.api.routes(r) }

// Checks are the catalog's health checks.
func (s *Service) Checks() map[string]func(context.Context) error { return s.checks }

// Ready is closed once the catalog consumes its queues.
func (s *Service) Ready() <-chan struct{} { return s.ready }

// Run keeps the read model until ctx is done.
func (s *Service) Run(ctx context.Context) error { return s.run(ctx) }

// Rebuild starts a rebuild of the read model by replay and returns its replay id.
func (s *Service) Rebuild(ctx context.Context) (string, error) { return s.rebuild(ctx) }
