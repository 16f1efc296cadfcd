// Command products is the products service: the HTTP API of the Product
// write side, its command handlers, and the outbox relay to RabbitMQ.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/statemill/statemill/services/products/service"
)

// envVars lists every environment variable the service reads (the compose
// test checks that docker-compose.yml sets them).
var envVars = []string{"DATABASE_URL", "AMQP_URL", "AMQP_DECLARE", "HTTP_ADDR", "EVENTS_EXCHANGE", "COMMANDS_EXCHANGE", "LOG_LEVEL"}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := service.ConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "products:", err)
		os.Exit(2)
	}
	slog.SetDefault(cfg.Logger)
	if err := service.Run(ctx, cfg); err != nil {
		slog.Error("products stopped", "err", err)
		os.Exit(1)
	}
}
