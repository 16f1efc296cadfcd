package service

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

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

	err = web.Lifecycle{
		Server: srv, Listener: ln, Background: svc.Run, Accepting: svc.Accepting(), Drain: svc.Drain,
		ShutdownTimeout: cfg.ShutdownTimeout,
		Serving:         func() { log.Info("products service listening", "addr", ln.Addr().String()) },
	}.Run(ctx)
	log.Info("products service stopped")
	return err
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
