package service

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"time"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/startup"
)

// Config is what Run needs. Zero values take the defaults.
type Config struct {
	AMQPURL  string
	HTTPAddr string          // default ":8082"
	Topology broker.Topology // default exchanges "events" and "commands"
	// ProductsURL is the products service, which the server (never the
	// browser) asks for a product's history. Default http://localhost:8080.
	ProductsURL string
	// Prefix names this instance's queue and is the prefix of its replays.
	// Default "ui-" and 8 random hex digits: every instance has its own.
	Prefix string
	// QueueExpires is how long the instance's queue outlives it. Default 60s.
	QueueExpires time.Duration
	// ReplayTimeout is how long a latest replay may take before it is asked
	// for again. Default 1 minute.
	ReplayTimeout time.Duration
	// History is how many recent changes are kept for browsers that
	// reconnect (Last-Event-ID); older ones get a fresh snapshot. Default 1024.
	History int
	// Heartbeat is how often an idle event stream gets a comment, so proxies
	// and the browser see it alive. Default 15s.
	Heartbeat time.Duration
	// Retry is the reconnection delay the event stream suggests to
	// browsers. Default 2s.
	Retry time.Duration
	// HistoryTimeout bounds a history request to the products service.
	// Default 5s.
	HistoryTimeout time.Duration
	// Listener, when set, is served instead of listening on HTTPAddr (tests
	// pass one on port 0).
	Listener        net.Listener
	ShutdownTimeout time.Duration // default 20s
	Logger          *slog.Logger
}

func (c *Config) setDefaults() {
	if c.AMQPURL == "" {
		c.AMQPURL = "amqp://guest:guest@localhost:5672/"
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = ":8082"
	}
	if c.ProductsURL == "" {
		c.ProductsURL = "http://localhost:8080"
	}
	c.Topology = c.Topology.WithDefaults()
	if c.Heartbeat == 0 {
		c.Heartbeat = 15 * time.Second
	}
	if c.Retry == 0 {
		c.Retry = 2 * time.Second
	}
	if c.HistoryTimeout == 0 {
		c.HistoryTimeout = 5 * time.Second
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports what is wrong. The view's own settings (prefix, queue
// expiry) are checked when Run builds it.
func (c Config) Validate() error {
	var errs []error
	u, err := url.Parse(c.ProductsURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("PRODUCTS_URL %q must be an absolute http(s) URL", c.ProductsURL))
	}
	if c.Heartbeat < 0 || c.Retry < 0 || c.HistoryTimeout < 0 || c.ShutdownTimeout < 0 {
		errs = append(errs, errors.New("durations must not be negative"))
	}
	if err := c.Topology.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ConfigFromEnv reads the environment variables of DESIGN §9 and PRODUCTS_URL.
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
		AMQPURL:     getenv("AMQP_URL"),
		HTTPAddr:    getenv("HTTP_ADDR"),
		ProductsURL: getenv("PRODUCTS_URL"),
		Topology:    topology,
		Logger:      slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	cfg.setDefaults()
	return cfg, cfg.Validate()
}
