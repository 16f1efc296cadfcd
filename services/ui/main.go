// Command ui is the live web UI: a page that shows every product and each
// change as it happens, over an in-memory read model that a latest replay
// fills at start (and after every broker reconnect).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/statemill/statemill/services/ui/service"
)

// envVars lists every environment variable the service reads (the compose
// test checks that docker-compose.yml sets them). The ui keeps no database.
var envVars = []string{"AMQP_URL", "AMQP_DECLARE", "HTTP_ADDR", "EVENTS_EXCHANGE", "COMMANDS_EXCHANGE", "PRODUCTS_URL", "LOG_LEVEL"}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := service.ConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ui:", err)
		os.Exit(2)
	}
	slog.SetDefault(cfg.Logger)
	if err := service.Run(ctx, cfg); err != nil {
		slog.Error("ui stopped", "err", err)
		os.Exit(1)
	}
}
