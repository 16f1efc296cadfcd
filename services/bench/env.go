package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/handlers"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/pgstore"
)

// The servers the bench runs against: the same variables and defaults as
// the tests (infra/sandbox), so `make bench` and `make test` need the same
// setup.
const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

// env owns everything a run creates on the shared servers (databases,
// exchanges, queues) and the service processes it starts, so that cleanup
// removes all of it whatever way the run ends.
type env struct {
	adminURL string
	amqpURL  string
	runID    string // short random hex: names of this run's objects
	logf     func(format string, args ...any)
	bins     binaries

	mu        sync.Mutex
	databases []string
	queues    []string
	exchanges []string
	procs     []*proc
}

func newEnv(logf func(string, ...any)) (*env, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("run id: %w", err)
	}
	return &env{
		adminURL: envOr("TEST_DATABASE_URL", defaultDatabaseURL),
		amqpURL:  envOr("TEST_AMQP_URL", defaultAMQPURL),
		runID:    hex.EncodeToString(b),
		logf:     logf,
	}, nil
}

// name is a broker or worker name unique to this run; it matches the
// replay-prefix rule (^[a-z][a-z0-9-]{0,39}$), so it can name a catalog.
func (e *env) name(label string) string { return "bench-" + e.runID + "-" + label }

// check fails fast, with a hint, when a server is not reachable.
func (e *env) check(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, e.adminURL)
	if err != nil {
		return fmt.Errorf("PostgreSQL unreachable at %s (TEST_DATABASE_URL): %w", e.adminURL, err)
	}
	_ = conn.Close(ctx)
	ac, err := amqp091.DialConfig(e.amqpURL, amqp091.Config{Dial: amqp091.DefaultDial(5 * time.Second)})
	if err != nil {
		return fmt.Errorf("RabbitMQ unreachable at %s (TEST_AMQP_URL): %w", e.amqpURL, err)
	}
	_ = ac.Close()
	return nil
}

// createDB creates an empty database for this run and returns its URL.
func (e *env) createDB(ctx context.Context, label string) (string, error) {
	name := "statemill_bench_" + e.runID + "_" + label
	conn, err := pgx.Connect(ctx, e.adminURL)
	if err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	e.mu.Lock()
	e.databases = append(e.databases, name)
	e.mu.Unlock()
	u, err := url.Parse(e.adminURL)
	if err != nil {
		return "", fmt.Errorf("parse %s: %w", e.adminURL, err)
	}
	u.Path = "/" + name
	return u.String(), nil
}

// deleteLater records broker objects to delete at cleanup. Objects are
// recorded before they exist, so an interrupted run removes them too.
func (e *env) deleteLater(queues, exchanges []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.queues = append(e.queues, queues...)
	e.exchanges = append(e.exchanges, exchanges...)
}

// cleanup stops every process, then deletes the broker objects and drops
// the databases. It runs on a context of its own: it must also work after
// an interrupt cancelled the run's.
func (e *env) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e.mu.Lock()
	procs := append([]*proc(nil), e.procs...)
	queues := append([]string(nil), e.queues...)
	exchanges := append([]string(nil), e.exchanges...)
	databases := append([]string(nil), e.databases...)
	e.mu.Unlock()

	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Go(func() {
			if err := p.stop(); err != nil {
				e.logf("cleanup: %v", err)
			}
		})
	}
	wg.Wait()

	if err := deleteBrokerObjects(e.amqpURL, queues, exchanges); err != nil {
		e.logf("cleanup: broker: %v", err)
	}
	if len(databases) > 0 {
		conn, err := pgx.Connect(ctx, e.adminURL)
		if err != nil {
			e.logf("cleanup: cannot drop databases %v: %v", databases, err)
		} else {
			for _, db := range databases {
				if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)"); err != nil {
					e.logf("cleanup: drop database %s: %v", db, err)
				}
			}
			_ = conn.Close(ctx)
		}
	}
	e.bins.remove()
}

// deleteBrokerObjects deletes queues and exchanges. A failed operation
// closes the AMQP channel, so each gets a fresh channel when needed.
func deleteBrokerObjects(amqpURL string, queues, exchanges []string) error {
	if len(queues)+len(exchanges) == 0 {
		return nil
	}
	conn, err := amqp091.DialConfig(amqpURL, amqp091.Config{Dial: amqp091.DefaultDial(5 * time.Second)})
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	var ch *amqp091.Channel
	var errs []error
	do := func(what string, op func(*amqp091.Channel) error) {
		if ch == nil || ch.IsClosed() {
			if ch, err = conn.Channel(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", what, err))
				return
			}
		}
		if err := op(ch); err != nil {
			var ae *amqp091.Error
			if errors.As(err, &ae) && ae.Code == amqp091.NotFound {
				return
			}
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		}
	}
	for _, q := range queues {
		do("delete queue "+q, func(ch *amqp091.Channel) error { _, err := ch.QueueDelete(q, false, false, false); return err })
	}
	for _, x := range exchanges {
		do("delete exchange "+x, func(ch *amqp091.Channel) error { return ch.ExchangeDelete(x, false, false) })
	}
	return errors.Join(errs...)
}

// system is one isolated deployment: a products database and process, a
// namespaced exchange set, and optionally a catalog with its own database
// (a service owns its read model). Scenarios that must not disturb each
// other (a drained backlog, a million-event history) get systems of their
// own.
type system struct {
	e        *env
	label    string
	topology broker.Topology
	dbURL    string
	products *proc

	catalogName string
	catalogDB   string
	catalog     *proc
}

func (e *env) newSystem(ctx context.Context, label string) (*system, error) {
	db, err := e.createDB(ctx, label)
	if err != nil {
		return nil, err
	}
	ns := e.name(label)
	t := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	replayQueue := t.CommandsExchange + "." + handlers.ReplayQueue
	e.deleteLater([]string{t.UnroutableQueue(), replayQueue, replayQueue + ".dead"},
		[]string{t.EventsExchange, t.UnroutableExchange(), t.CommandsExchange})
	return &system{e: e, label: label, topology: t, dbURL: db}, nil
}

func (s *system) vars() map[string]string {
	return map[string]string{
		"AMQP_URL":          s.e.amqpURL,
		"HTTP_ADDR":         "127.0.0.1:0",
		"EVENTS_EXCHANGE":   s.topology.EventsExchange,
		"COMMANDS_EXCHANGE": s.topology.CommandsExchange,
		// warn: at info the services log every request, which would cost
		// them (and the bench reading their stderr) CPU under load.
		"LOG_LEVEL": envOr("BENCH_SERVICE_LOG_LEVEL", "warn"),
	}
}

// startProducts starts the products service of s (it migrates the database).
func (s *system) startProducts(ctx context.Context) error {
	v := s.vars()
	v["DATABASE_URL"] = s.dbURL
	p, err := s.e.start(ctx, "products", s.label+"/products", v)
	if err != nil {
		return err
	}
	s.products = p
	return nil
}

// startCatalog starts the catalog of s, creating its database and naming
// the worker on the first call.
func (s *system) startCatalog(ctx context.Context) error {
	if s.catalogDB == "" {
		db, err := s.e.createDB(ctx, s.label+"_catalog")
		if err != nil {
			return err
		}
		s.catalogDB, s.catalogName = db, s.e.name(s.label+"-cat")
		n := s.catalogName
		s.e.deleteLater([]string{n + ".live", n + ".replay", n + ".dead"}, []string{n + ".dead"})
	}
	v := s.vars()
	v["DATABASE_URL"] = s.catalogDB
	v["CATALOG_NAME"] = s.catalogName
	p, err := s.e.start(ctx, "catalog", s.label+"/catalog", v)
	if err != nil {
		return err
	}
	s.catalog = p
	return nil
}

// purgeQueue empties a queue (the unroutable queue fills while no consumer
// is bound; the bench keeps the broker's memory down between phases).
func (e *env) purgeQueue(name string) error {
	conn, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		return fmt.Errorf("purge %s: %w", name, err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("purge %s: %w", name, err)
	}
	defer ch.Close()
	if _, err := ch.QueuePurge(name, false); err != nil {
		return fmt.Errorf("purge %s: %w", name, err)
	}
	return nil
}

// openMigrated opens a pool on url and applies the products schema (framework
// and domain migrations), as the products service does at start.
func openMigrated(ctx context.Context, url string, maxConns int32) (*pgxpool.Pool, error) {
	pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: url, MaxConns: maxConns})
	if err != nil {
		return nil, err
	}
	if err := pgstore.Migrate(ctx, pool, pgstore.Framework(), handlers.Migrations()); err != nil {
		pool.Close()
		return nil, fmt.Errorf("migrate: %w", err)
	}
	return pool, nil
}
