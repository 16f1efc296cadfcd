package main

import (
	"context"
	"fmt"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/membroker"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sqlitestore"
	"github.com/statemill/statemill/infra/web"
	catalogsvc "github.com/statemill/statemill/services/catalog/service"
	productssvc "github.com/statemill/statemill/services/products/service"
	uisvc "github.com/statemill/statemill/services/ui/service"
)

// Run serves every part until ctx is done, then stops cleanly: no new
// requests, in-flight commands finish, the relay publishes what was
// committed, the event streams end.
func Run(ctx context.Context, cfg Config) error {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	mode, _ := cfg.Mode()
	log := cfg.Logger.With("mode", string(mode))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var (
		products productssvc.Deps
		catalog  catalogsvc.Deps
		dial     broker.Dialer
		where    string
	)
	switch mode {
	case Embedded:
		db, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: cfg.SQLitePath})
		if err != nil {
			return err
		}
		defer db.Close()
		mb, err := membroker.New(membroker.Config{})
		if err != nil {
			return err
		}
		defer mb.Close()
		dial = mb.Dialer()
		products = productssvc.Deps{SQLite: db, Dial: dial, Registerer: reg}
		catalog = catalogsvc.Deps{Dial: dial, Registerer: reg} // kept in memory
		where = fmt.Sprintf("embedded: SQLite %s, in-process broker", cfg.SQLitePath)
	case Services:
		pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: cfg.DatabaseURL})
		if err != nil {
			return err
		}
		defer pool.Close()
		dial = broker.AMQPDialer(cfg.AMQPURL)
		products = productssvc.Deps{Pool: pool, Dial: dial, Registerer: reg}
		catalog = catalogsvc.Deps{Pool: pool, Dial: dial, Registerer: reg}
		where = "PostgreSQL and RabbitMQ"
	}

	ln := cfg.Listener
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}
	defer ln.Close()
	self := baseURL(ln.Addr())

	productsSvc, err := productssvc.New(ctx, productssvc.Config{Topology: cfg.Topology, Logger: log.With("part", "products")}, products)
	if err != nil {
		return fmt.Errorf("products: %w", err)
	}
	catalogSvc, err := catalogsvc.New(ctx, catalogsvc.Config{Name: cfg.CatalogName, Topology: cfg.Topology, Logger: log.With("part", "catalog")}, catalog)
	if err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	// The ui asks the products API for histories: it is this process.
	uiSvc, err := uisvc.New(uisvc.Config{ProductsURL: self, Topology: cfg.Topology, Logger: log.With("part", "ui")},
		uisvc.Deps{Dial: dial, Registerer: reg})
	if err != nil {
		return fmt.Errorf("ui: %w", err)
	}

	httpMetrics, err := web.NewHTTPMetrics(reg)
	if err != nil {
		return err
	}
	router := web.NewRouter()
	productsSvc.Routes(router)
	catalogSvc.Routes(router)
	uiSvc.Routes(router)
	checks := map[string]func(context.Context) error{}
	for part, c := range map[string]map[string]func(context.Context) error{
		"products": productsSvc.Checks(), "catalog": catalogSvc.Checks(), "ui": uiSvc.Checks(),
	} {
		for name, check := range c {
			checks[part+"."+name] = check
		}
	}
	router.Handle("GET /healthz", web.HealthHandler(checks))
	router.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	srv := web.NewServer(cfg.HTTPAddr, web.Chain(router, web.RequestID, httpMetrics.Middleware, web.Log, web.Recover))
	srv.RegisterOnShutdown(uiSvc.StopStreams)

	// One background task runs the three parts; the first to fail stops all.
	background := func(ctx context.Context) error {
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() error { return productsSvc.Run(gctx) })
		g.Go(func() error { return catalogSvc.Run(gctx) })
		g.Go(func() error { return uiSvc.Run(gctx) })
		return g.Wait()
	}
	err = web.Lifecycle{
		Server: srv, Listener: ln, Background: background, Accepting: productsSvc.Accepting(),
		Drain: productsSvc.Drain, ShutdownTimeout: cfg.ShutdownTimeout,
		Serving: func() {
			log.Info("statemill listening", "addr", ln.Addr().String(), "url", self, "backends", where)
			fmt.Fprintf(cfg.Out, "statemill is running at %s (%s)\n", self, where)
		},
	}.Run(ctx)
	log.Info("statemill stopped")
	return err
}

// baseURL is the URL a browser on this machine opens for addr: a wildcard
// address is served on localhost too.
func baseURL(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return "http://" + addr.String() + "/"
	}
	host := tcp.IP.String()
	if tcp.IP.IsUnspecified() {
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, fmt.Sprint(tcp.Port)) + "/"
}
