package service

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/statemill/statemill/infra/broker"
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
	level := slog.LevelInfo
	if v := getenv("LOG_LEVEL"); v != "" {
		if err := level.UnmarshalText([]byte(strings.ToUpper(v))); err != nil {
			return Config{}, errors.New("LOG_LEVEL must be debug, info, warn or error")
		}
	}
	passive, err := broker.ParseDeclareMode(getenv("AMQP_DECLARE"))
	if err != nil {
		return Config{}, fmt.Errorf("AMQP_DECLARE: %w", err)
	}
	cfg := Config{
		DatabaseURL: getenv("DATABASE_URL"),
		AMQPURL:     getenv("AMQP_URL"),
		HTTPAddr:    getenv("HTTP_ADDR"),
		Topology: broker.Topology{
			EventsExchange:   getenv("EVENTS_EXCHANGE"),
			CommandsExchange: getenv("COMMANDS_EXCHANGE"),
			Passive:          passive,
		},
		Logger: slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	cfg.setDefaults()
	return cfg, cfg.Validate()
}
