// Command faults is statemill's fault suite. It runs each scenario (a
// service killed, the broker or the database restarted, a long
// transaction, poison messages, a rebuild) while concurrent clients send
// commands, with the services as separate processes against a PostgreSQL
// cluster and a RabbitMQ node of its own, and reports per scenario what was
// attempted, acknowledged, stored, published and applied, what was lost or
// applied twice, and whether the read model converged with the write model
// and with a fresh rebuild.
//
//	go run ./services/faults [-short] [-out file] [-scenario name[,name]] [-commands n] [-race] [-keep]
//
// The JSON report goes to -out (default $FAULTS_OUT, else
// faults-results.json) and a table to stdout. It exits 1 when a scenario
// fails, 2 when the suite could not run.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	var o options
	var scenarioList string
	flag.BoolVar(&o.Short, "short", false, "about 1,000 commands per scenario and shorter faults (CI)")
	flag.StringVar(&o.Out, "out", envOr("FAULTS_OUT", "faults-results.json"), "where the JSON report goes")
	flag.StringVar(&scenarioList, "scenario", "", "run only these scenarios (names or numbers, comma-separated)")
	flag.IntVar(&o.Commands, "commands", 0, "commands per scenario (default 10,000; 1,000 with -short)")
	flag.BoolVar(&o.Race, "race", false, "build the services with the race detector")
	flag.BoolVar(&o.Keep, "keep", false, "keep the run's directory (service logs, data) afterwards")
	flag.Parse()
	if scenarioList != "" {
		o.Scenarios = strings.Split(scenarioList, ",")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := runSuite(ctx, o)
	if rep != nil && len(rep.Scenarios) > 0 {
		printTable(os.Stdout, rep)
		if werr := writeReport(o.Out, rep); werr != nil {
			fmt.Fprintln(os.Stderr, "faults:", werr)
			os.Exit(2)
		}
		fmt.Println("report:", o.Out)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(2)
	}
	if !rep.OK {
		os.Exit(1)
	}
}

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

func writeReport(path string, rep *report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("report: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("report: %w", err)
	}
	return nil
}
