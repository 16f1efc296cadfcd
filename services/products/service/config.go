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

// Config is what Run needs. Zero values take the defaults of DESIGN §9.
type Config struct {
	DatabaseURL string
	AMQPURL     string
	HTTPAddr    string          // default ":8080"
	Topology    broker.Topology // default exchanges "events" and "commands"
	// Listener, when set, is served instead of listening on HTTPAddr (tests
	// pass one on port 0).
	Listener net.Listener
	// ShutdownTimeout bounds the graceful stop: in-flight requests and
	// commands, then the relay's flush. Default 20s.
	ShutdownTimeout time.Duration
	// DBMaxConns bounds the connection pool. Default 16.
	DBMaxConns int32
	Logger     *slog.Logger
}

func (c *Config) setDefaults() {
	if c.AMQPURL == "" {
		c.AMQPURL = "amqp://guest:guest@localhost:5672/"
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = ":8080"
	}
	c.Topology = c.Topology.WithDefaults()
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

// ConfigFromEnv reads the environment variables of DESIGN §9.
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
		Topology:    topology,
		Logger:      slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	cfg.setDefaults()
	return cfg, cfg.Validate()
}
