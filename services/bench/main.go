// Command bench measures statemill against the real PostgreSQL and
// RabbitMQ, in one run, with the raw baselines it is compared to:
//
//	B1  a pgx transaction shaped like one command, 1 and 8 clients (tx/s)
//	B2  amqp091-go persistent publishes with confirms, 1 and 100 in flight (msg/s)
//	S1  adjust_inventory over HTTP, 8 clients: throughput, p50/p99, outbox backlog
//	S2  the relay draining a 50,000-event outbox backlog (events/s)
//	S3  commit → applied in the catalog at half of S1's throughput (p50/p99)
//	S4  a full rebuild of the catalog from 1,000,000 history events (events/s,
//	    peak RSS), and the same replay consumed naively for comparison
//
// It builds the products and catalog services and runs them as child
// processes, each scenario on databases and exchanges of its own that it
// removes afterwards, also on error or Ctrl-C. Every figure is the median
// of three runs after a warm-up, with min and max. It prints a table and
// writes JSON to -out ($BENCH_OUT, default bench-results.json). It never
// judges speed: it exits non-zero only when something fails.
//
//	go run ./services/bench          # full, several minutes (make bench)
//	go run ./services/bench -short   # smoke test with tiny counts, < 1 min (make bench-short)
//
// The servers are those of the tests: TEST_DATABASE_URL (default
// postgres://postgres@127.0.0.1:5432/postgres) and TEST_AMQP_URL (default
// amqp://guest:guest@127.0.0.1:5672/). -only b1,s4 runs some scenarios (s3
// needs s1). For a closer look, BENCH_SERVICE_LOG_LEVEL (default warn) sets
// the services' LOG_LEVEL and BENCH_LOG_DIR keeps their logs there.
//
// Besides the figures the issue asks for, it records what was busy: the
// machine's CPU, the services' CPU and the time their threads waited for a
// CPU, and during a rebuild the depth of the replay queue and the replay
// responder's own rate. Those tell what bounded a figure on this machine.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	short := flag.Bool("short", false, "smoke test: tiny counts, one repetition, under a minute")
	out := flag.String("out", envOr("BENCH_OUT", "bench-results.json"), "where to write the JSON results")
	only := flag.String("only", "", "comma-separated scenarios to run (b1,b2,s1,s2,s3,s4; s3 needs s1); default all")
	flag.Parse()
	// The bench migrates databases itself; pgstore logs each migration at
	// info, which would only clutter the progress lines.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, options{Short: *short, Only: *only, Log: os.Stderr})
	if res == nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "bench: interrupted; its databases, exchanges, queues and processes are removed")
			stop()
			os.Exit(130)
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		stop()
		os.Exit(1)
	}
	if perr := printTable(os.Stdout, res); perr != nil {
		err = errors.Join(err, perr)
	}
	if werr := writeResults(*out, res); werr != nil {
		err = errors.Join(err, werr)
	} else {
		fmt.Printf("results written to %s\n", *out)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		stop()
		os.Exit(1)
	}
}

func writeResults(path string, res *results) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}
