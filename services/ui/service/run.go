package service

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/liveview"
)

// Deps are what a Service runs on.
type Deps struct {
	// Dial connects to the broker. Default broker.AMQPDialer(Config.AMQPURL).
	Dial       broker.Dialer
	Registerer prometheus.Registerer
}

// Service is the live ui: the page, its event streams and the in-memory
// model a View keeps. Run serves it alone; services/all mounts it beside
// the other services.
type Service struct {
	api    *api
	view   *projection.View
	prefix string
}

// New builds the ui; nothing runs until Run.
func New(cfg Config, deps Deps) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Prefix == "" {
		p, err := projection.InstancePrefix("ui")
		if err != nil {
			return nil, err
		}
		cfg.Prefix = p
	}
	if deps.Dial == nil {
		deps.Dial = broker.AMQPDialer(cfg.AMQPURL)
	}
	if deps.Registerer == nil {
		deps.Registerer = prometheus.NewRegistry()
	}
	log := cfg.Logger.With("instance", cfg.Prefix)
	products, err := url.Parse(strings.TrimRight(cfg.ProductsURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("PRODUCTS_URL: %w", err)
	}
	model, err := liveview.New(liveview.Config{History: cfg.History, Logger: log})
	if err != nil {
		return nil, err
	}
	view, err := projection.NewView(projection.ViewConfig{
		Prefix:        cfg.Prefix,
		EntityTypes:   []string{events.EntityType},
		Projection:    model,
		Dial:          deps.Dial,
		Topology:      cfg.Topology,
		QueueExpires:  cfg.QueueExpires,
		ReplayTimeout: cfg.ReplayTimeout,
		// The page shows whether its data is live: the model carries the
		// view's state to every stream.
		OnStatus: func(st projection.ViewStatus) {
			model.SetStatus(liveview.Status{Connected: st.Connected, Replaying: st.Replaying})
		},
		Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("view: %w%s", err, fieldsText(err))
	}
	for _, c := range viewCollectors(model, view) {
		if err := deps.Registerer.Register(c); err != nil {
			return nil, err
		}
	}
	a, err := newAPI(model, products, cfg)
	if err != nil {
		return nil, err
	}
	return &Service{api: a, view: view, prefix: cfg.Prefix}, nil
}

// Routes adds the page (/), its assets (/static/) and the ui's API (/ui/...)
// to r, behind the page's security headers.
func (s *Service) Routes(r *web.Router) {
	s.api.routes(r, securityHeaders)
}

// Checks are the ui's health checks.
func (s *Service) Checks() map[string]func(context.Context) error {
	return map[string]func(context.Context) error{
		"broker": func(context.Context) error {
			if !s.view.Status().Connected {
				return errors.New("not consuming")
			}
			return nil
		},
		// Until the latest replay is complete the page would be missing
		// products.
		"model": func(context.Context) error {
			if st := s.view.Status(); st.Replaying {
				return fmt.Errorf("replaying: %d of %d events", st.Received, st.Expected)
			}
			return nil
		},
	}
}

// Queue is the name of the instance's queue.
func (s *Service) Queue() string { return s.view.Queue() }

// Run keeps the model until ctx is done.
func (s *Service) Run(ctx context.Context) error { return s.view.Run(ctx) }

// StopStreams ends the event streams: an HTTP server's Shutdown waits for
// handlers to return, and a stream never does on its own.
func (s *Service) StopStreams() { s.api.stopStreams() }

// Run serves the ui until ctx is done, then stops cleanly: event streams
// end (browsers reconnect to another instance or when this one is back),
// requests in flight finish, the queue is left to expire.
func Run(ctx context.Context, cfg Config) error {
	cfg.setDefaults()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	svc, err := New(cfg, Deps{Registerer: reg})
	if err != nil {
		return err
	}
	log := cfg.Logger.With("instance", svc.prefix)
	httpMetrics, err := web.NewHTTPMetrics(reg)
	if err != nil {
		return err
	}
	router := web.NewRouter()
	svc.Routes(router)
	router.Handle("GET /healthz", web.HealthHandler(svc.Checks()))
	router.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	srv := web.NewServer(cfg.HTTPAddr, web.Chain(router, web.RequestID, httpMetrics.Middleware, web.Log, web.Recover))
	srv.RegisterOnShutdown(svc.StopStreams)

	ln := cfg.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}

	err = web.Lifecycle{
		Server: srv, Listener: ln, Background: svc.Run, ShutdownTimeout: cfg.ShutdownTimeout,
		Serving: func() {
			log.Info("ui service listening", "addr", ln.Addr().String(), "queue", svc.Queue(), "products_url", cfg.ProductsURL)
		},
	}.Run(ctx)
	log.Info("ui service stopped")
	return err
}

// fieldsText spells out the per-field messages of an apperr error, which
// its Error() leaves out, for a start-up failure to say what is wrong.
func fieldsText(err error) string {
	ae := apperr.As(err)
	if ae == nil || len(ae.Fields) == 0 {
		return ""
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(ae.Fields)) {
		parts = append(parts, k+": "+ae.Fields[k])
	}
	return " (" + strings.Join(parts, "; ") + ")"
}

// viewCollectors export the view's and the model's state.
func viewCollectors(model *liveview.Model, view *projection.View) []prometheus.Collector {
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "statemill", Subsystem: "ui", Name: name, Help: help}, f)
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "statemill", Subsystem: "ui", Name: name, Help: help}, f)
	}
	return []prometheus.Collector{
		gauge("products", "Products in the live model.", func() float64 { return float64(model.Len()) }),
		gauge("streams", "Open event streams (browsers watching).", func() float64 { return float64(model.Watchers()) }),
		gauge("connected", "1 while the view consumes its queue.", func() float64 { return b2f(view.Status().Connected) }),
		gauge("replaying", "1 while a latest replay refills the model.", func() float64 { return b2f(view.Status().Replaying) }),
		counter("events_applied_total", "Events handed to the live model (live and replayed).", func() float64 { return float64(view.Status().Applied) }),
		counter("messages_dropped_total", "Messages dropped: undecodable, or of a replay that is not current.", func() float64 { return float64(view.Status().Dropped) }),
		counter("replays_total", "Latest replays completed.", func() float64 { return float64(view.Status().Replays) }),
		counter("reconnects_total", "Broker sessions after the first.", func() float64 { return float64(view.Status().Reconnects) }),
	}
}
