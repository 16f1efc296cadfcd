// Command catalog is the catalog service: a projection worker that keeps the
// catalog read model from Product events, and its HTTP API.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/statemill/statemill/services/catalog/service"
)

// envVars lists every environment variable the service reads (the compose
// test checks that docker-compose.yml sets them).
var envVars = []string{"DATABASE_URL", "AMQP_URL", "AMQP_DECLARE", "HTTP_ADDR", "EVENTS_EXCHANGE", "COMMANDS_EXCHANGE", "CATALOG_NAME", "LOG_LEVEL"}

func main() {
	rebuild := flag.Bool("rebuild", false, "rebuild the catalog from a replay at start (the old model serves reads meanwhile)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := service.ConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "catalog:", err)
		os.Exit(2)
	}
	cfg.RebuildAtStart = *rebuild
	slog.SetDefault(cfg.Logger)
	if err := service.Run(ctx, cfg); err != nil {
		slog.Error("catalog stopped", "err", err)
		os.Exit(1)
	}
}
