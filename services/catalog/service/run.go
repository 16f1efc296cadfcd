package service

import (
	"context"
	"fmt"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/web"
)

// Run serves the catalog until ctx is done, then stops cleanly: no new
// requests, the batch in flight is applied and acked.
func Run(ctx context.Context, cfg Config) error {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := cfg.Logger

	pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: cfg.DatabaseURL, MaxConns: cfg.DBMaxConns})
	if err != nil {
		return err
	}
	defer pool.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	svc, err := New(ctx, cfg, Deps{Pool: pool, Registerer: reg})
	if err != nil {
		return err
	}

	httpMetrics, err := web.NewHTTPMetrics(reg)
	if err != nil {
		return err
	}
	router := web.NewRouter()
	svc.Routes(router)
	router.Handle("GET /healthz", web.HealthHandler(svc.Checks()))
	router.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	srv := web.NewServer(cfg.HTTPAddr, web.Chain(router, web.RequestID, httpMetrics.Middleware, web.Log, web.Recover))

	ln := cfg.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}

	background := svc.Run
	if cfg.RebuildAtStart {
		background = func(ctx context.Context) error {
			go func() {
				select {
				case <-svc.Ready():
				case <-ctx.Done():
					return
				}
				id, err := svc.Rebuild(ctx)
				if err != nil {
					log.Error("rebuild at start", "err", err)
					return
				}
				log.Info("rebuild started", "replay_id", id)
			}()
			return svc.Run(ctx)
		}
	}
	err = web.Lifecycle{
		Server: srv, Listener: ln, Background: background, ShutdownTimeout: cfg.ShutdownTimeout,
		Serving: func() { log.Info("catalog service listening", "addr", ln.Addr().String(), "worker", cfg.Name) },
	}.Run(ctx)
	log.Info("catalog service stopped")
	return err
}
