package main

import (
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/startup"
)

// envVars lists every environment variable the process reads.
var envVars = []string{
	"DATABASE_URL", "AMQP_URL", "SQLITE_PATH", "HTTP_ADDR", "EVENTS_EXCHANGE", "COMMANDS_EXCHANGE",
	"AMQP_DECLARE", "CATALOG_NAME", "LOG_LEVEL",
}

// DefaultSQLitePath is where the embedded mode keeps its database.
const DefaultSQLitePath = "var/statemill.db"

// Mode is how the process runs its parts.
type Mode string

const (
	// Embedded keeps everything in this process: an SQLite file and the
	// in-process broker. Nothing to install.
	Embedded Mode = "embedded"
	// Services uses PostgreSQL and RabbitMQ exactly as the separate
	// services do.
	Services Mode = "services"
)

// Config is what Run needs. Zero values take the defaults.
type Config struct {
	// DatabaseURL and AMQPURL select the mode: both set, PostgreSQL and
	// RabbitMQ; neither, embedded. One without the other is refused.
	DatabaseURL string
	AMQPURL     string
	// SQLitePath is the embedded database file (default var/statemill.db;
	// ":memory:" keeps it in memory, gone at exit).
	SQLitePath string
	HTTPAddr   string          // default ":8080"
	Topology   broker.Topology // default exchanges "events" and "commands"
	// CatalogName names the catalog worker and its replay prefix. Default "catalog".
	CatalogName string
	// Listener, when set, is served instead of listening on HTTPAddr (tests
	// pass one on port 0).
	Listener        net.Listener
	ShutdownTimeout time.Duration // default 20s
	Logger          *slog.Logger
	// Out is where the URL the process serves is printed. Default stdout.
	Out io.Writer
}

// Mode reports the mode the URLs select, or why they select none.
func (c Config) Mode() (Mode, error) {
	switch {
	case c.DatabaseURL != "" && c.AMQPURL != "":
		return Services, nil
	case c.DatabaseURL == "" && c.AMQPURL == "":
		return Embedded, nil
	case c.DatabaseURL != "":
		return "", errors.New("DATABASE_URL is set but AMQP_URL is not: set both to use PostgreSQL and RabbitMQ, or neither to run embedded (SQLite and an in-process broker)")
	default:
		return "", errors.New("AMQP_URL is set but DATABASE_URL is not: set both to use PostgreSQL and RabbitMQ, or neither to run embedded (SQLite and an in-process broker)")
	}
}

func (c *Config) setDefaults() {
	if c.SQLitePath == "" {
		c.SQLitePath = DefaultSQLitePath
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = ":8080"
	}
	if c.CatalogName == "" {
		c.CatalogName = "catalog"
	}
	c.Topology = c.Topology.WithDefaults()
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Out == nil {
		c.Out = os.Stdout
	}
}

// Validate reports a configuration the process cannot run with.
func (c Config) Validate() error {
	if _, err := c.Mode(); err != nil {
		return err
	}
	return c.Topology.Validate()
}

// configFromEnv reads the environment, then the flags (which win).
func configFromEnv(getenv func(string) string, args []string) (Config, error) {
	level, err := startup.LogLevel(getenv("LOG_LEVEL"))
	if err != nil {
		return Config{}, err
	}
	topology, err := broker.TopologyFromEnv(getenv)
	if err != nil {
		return Config{}, err
	}
	cfg := Config{
		DatabaseURL: getenv("DATABASE_URL"),
		AMQPURL:     getenv("AMQP_URL"),
		SQLitePath:  getenv("SQLITE_PATH"),
		HTTPAddr:    getenv("HTTP_ADDR"),
		CatalogName: getenv("CATALOG_NAME"),
		Topology:    topology,
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	fs := flag.NewFlagSet("all", flag.ContinueOnError)
	fs.StringVar(&cfg.SQLitePath, "sqlite", cfg.SQLitePath, "embedded database file (env SQLITE_PATH; \":memory:\" keeps nothing)")
	fs.StringVar(&cfg.HTTPAddr, "addr", cfg.HTTPAddr, "HTTP address (env HTTP_ADDR)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	cfg.setDefaults()
	return cfg, cfg.Validate()
}
