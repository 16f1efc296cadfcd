package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/handlers"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/startup"
	"github.com/statemill/statemill/infra/web"
)

// Run serves the products service until ctx is done, then stops cleanly:
// no new requests, in-flight commands finish, the relay flushes the outbox.
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
	// A reconnecting connection of its own tells the health check whether
	// RabbitMQ is reachable.
	var conn *amqp.ConnectionWrapper
	if err := startup.Retry(ctx, log, "connect to RabbitMQ", func() (err error) {
		conn, err = broker.Connect(cfg.AMQPURL, watermill.NopLogger{})
		return err
	}); err != nil {
		return err
	}
	defer conn.Close()

	httpMetrics, err := web.NewHTTPMetrics(reg)
	if err != nil {
		return err
	}
	router := web.NewRouter()
	svc.Routes(router)
	checks := svc.Checks()
	checks["rabbitmq"] = func(context.Context) error {
		if !conn.IsConnected() {
			return errors.New("not connected")
		}
		return nil
	}
	router.Handle("GET /healthz", web.HealthHandler(checks))
	router.Handle("GET /metrics", promHandler(reg))
	srv := web.NewServer(cfg.HTTPAddr, web.Chain(router, web.RequestID, httpMetrics.Middleware, web.Log, web.Recover))

	ln := cfg.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}

	// Background work runs on its own context: on shutdown it stops only
	// after the HTTP server and the commands in flight have.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	g, gctx := errgroup.WithContext(workCtx)
	g.Go(func() error { return svc.Run(gctx) })
	g.Go(func() error {
		select {
		case <-svc.Accepting():
		case <-gctx.Done():
			return nil
		}
		log.Info("products service listening", "addr", ln.Addr().String())
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})

	select {
	case <-ctx.Done():
	case <-gctx.Done():
	}
	log.Info("products service stopping")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	var errs []error
	if err := srv.Shutdown(shutdownCtx); err != nil {
		errs = append(errs, fmt.Errorf("http shutdown: %w", err))
	}
	if err := svc.Drain(shutdownCtx); err != nil {
		errs = append(errs, err)
	}
	stopWork()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, err)
	}
	log.Info("products service stopped")
	return errors.Join(errs...)
}

// ReplayQueue is the request queue for topology: DESIGN's
// products.replay_requests with the default commands exchange; with another
// exchange (a second deployment, or a test, on the same broker) the queue is
// named after it, so two deployments never consume each other's requests.
func ReplayQueue(t broker.Topology) string {
	if t.CommandsExchange == (broker.Topology{}).WithDefaults().CommandsExchange {
		return handlers.ReplayQueue
	}
	return t.CommandsExchange + "." + handlers.ReplayQueue
}
