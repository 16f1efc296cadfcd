package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

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

	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	g, gctx := errgroup.WithContext(workCtx)
	g.Go(func() error { return svc.Run(gctx) })
	if cfg.RebuildAtStart {
		g.Go(func() error {
			select {
			case <-svc.Ready():
			case <-gctx.Done():
				return nil
			}
			id, err := svc.Rebuild(gctx)
			if err != nil {
				log.Error("rebuild at start", "err", err)
				return nil
			}
			log.Info("rebuild started", "replay_id", id)
			return nil
		})
	}
	g.Go(func() error {
		log.Info("catalog service listening", "addr", ln.Addr().String(), "worker", cfg.Name)
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})

	select {
	case <-ctx.Done():
	case <-gctx.Done():
	}
	log.Info("catalog service stopping")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	var errs []error
	if err := srv.Shutdown(shutdownCtx); err != nil {
		errs = append(errs, fmt.Errorf("http shutdown: %w", err))
	}
	stopWork()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, err)
	}
	log.Info("catalog service stopped")
	return errors.Join(errs...)
}
