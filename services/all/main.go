// Command all runs the whole statemill example in one process on one port:
// the products service, the catalog and the live ui. With DATABASE_URL and
// AMQP_URL it uses PostgreSQL and RabbitMQ as the separate services do;
// with neither it runs embedded, on an SQLite file and an in-process broker,
// with nothing to install:
//
//	go run ./services/all
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := configFromEnv(os.Getenv, os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "statemill:", err)
		os.Exit(2)
	}
	slog.SetDefault(cfg.Logger)
	if err := Run(ctx, cfg); err != nil {
		slog.Error("statemill stopped", "err", err)
		os.Exit(1)
	}
}
