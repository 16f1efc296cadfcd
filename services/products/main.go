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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := configFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "products:", err)
		os.Exit(2)
	}
	slog.SetDefault(cfg.Logger)
	if err := Run(ctx, cfg); err != nil {
		slog.Error("products stopped", "err", err)
		os.Exit(1)
	}
}
