package service

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/startup"
)

// Config is what Run needs. Zero values take the defaults.
type Config struct {
	DatabaseURL string
	AMQPURL     string
	HTTPAddr    string          // default ":8081"
	Topology    broker.Topology // default exchanges "events" and "commands"
	// Name is the worker's name: its queues are <Name>.live, <Name>.replay
	// and <Name>.dead, and its replays come under the prefix <Name>.
	// Default "catalog" (env CATALOG_NAME).
	Name string
	// RebuildAtStart rebuilds the read model once the worker runs (-rebuild).
	RebuildAtStart bool
	// RebuildTimeout bounds a rebuild. Default 10m.
	RebuildTimeout time.Duration
	// Listener, when set, is served instead of listening on HTTPAddr.
	Listener        net.Listener
	ShutdownTimeout time.Duration // default 20s
	DBMaxConns      int32         // default 16
	Logger          *slog.Logger
}

func (c *Config) setDefaults() {
	if c.AMQPURL == "" {
		c.AMQPURL = "amqp://guest:guest@localhost:5672/"
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = ":8081"
	}
	if c.Name == "" {
		c.Name = "catalog"
	}
	c.Topology = c.Topology.WithDefaults()
	if c.RebuildTimeout == 0 {
		c.RebuildTimeout = 10 * time.Minute
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports what is missing.
func (c Config) Validate() error {
	if c.DatabaseURL == "" {
		return errors.New("DATABASE_URL is required")
	}
	return c.Topology.Validate()
}

// ConfigFromEnv reads the environment variables of DESIGN §9 and CATALOG_NAME.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
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
		HTTPAddr:    getenv("HTTP_ADDR"),
		Name:        getenv("CATALOG_NAME"),
		Topology:    topology,
		Logger:      slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	cfg.setDefaults()
	return cfg, cfg.Validate()
}
