package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// plan is how much of everything a mode runs.
type plan struct {
	Mode string
	Reps int // repetitions of every figure, after a warm-up

	Clients  int // concurrent clients of B1 (the larger count), S1 and S3
	Products int // products S1 and S3 (and B1) spread commands over

	BaselineWarmup, BaselineDuration time.Duration // B1, B2 per configuration
	S1Warmup, S1Duration             time.Duration
	BacklogEvery                     time.Duration // outbox backlog sampling during S1
	S2Warmup, S2Backlog              int           // events
	S3Warmup, S3Duration             time.Duration
	S3MinSamples                     int
	RebuildEvents, EventsPerProduct  int
	NaiveEvents, NaiveWarmup         int
}

// fullPlan is `make bench`. On a quiet 2-vCPU machine most of its time
// goes to the three million-event rebuilds and to writing their history;
// the other counts are sized to keep the whole run near ten minutes.
func fullPlan() plan {
	return plan{
		Mode: "full", Reps: 3, Clients: 8, Products: 1000,
		BaselineWarmup: time.Second, BaselineDuration: 2 * time.Second,
		S1Warmup: 2 * time.Second, S1Duration: 6 * time.Second, BacklogEvery: 100 * time.Millisecond,
		S2Warmup: 5000, S2Backlog: 50000,
		S3Warmup: time.Second, S3Duration: 4 * time.Second, S3MinSamples: 600,
		RebuildEvents: 1000000, EventsPerProduct: 100,
		NaiveEvents: 10000, NaiveWarmup: 1000,
	}
}

// shortPlan is the CI smoke test (-short): every scenario end to end with
// tiny counts and one repetition; its figures mean little.
func shortPlan() plan {
	return plan{
		Mode: "short", Reps: 1, Clients: 8, Products: 100,
		BaselineWarmup: 200 * time.Millisecond, BaselineDuration: 500 * time.Millisecond,
		S1Warmup: 300 * time.Millisecond, S1Duration: time.Second, BacklogEvery: 100 * time.Millisecond,
		S2Warmup: 200, S2Backlog: 1000,
		S3Warmup: 300 * time.Millisecond, S3Duration: time.Second, S3MinSamples: 100,
		RebuildEvents: 10000, EventsPerProduct: 100,
		NaiveEvents: 1000, NaiveWarmup: 100,
	}
}

// options configure a run.
type options struct {
	Short bool
	Only  string    // comma-separated scenario names; "" runs all
	Log   io.Writer // progress; nil discards it
}

// bench is one run in progress.
type bench struct {
	e      *env
	plan   plan
	res    *results
	logf   func(format string, args ...any)
	client *http.Client

	main *system  // S1 and S3
	ids  []string // S1's products
}

// run measures everything and returns the results; the caller prints them.
// When scenarios fail it returns what the others measured along with the
// error (nil results only when it could not start or was interrupted).
// Whatever happens, the databases, broker objects and processes it created
// are gone when it returns.
func run(ctx context.Context, o options) (*results, error) {
	p := fullPlan()
	if o.Short {
		p = shortPlan()
	}
	w := o.Log
	if w == nil {
		w = io.Discard
	}
	began := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(w, "%6.1fs "+format+"\n", append([]any{time.Since(began).Seconds()}, args...)...)
	}
	e, err := newEnv(logf)
	if err != nil {
		return nil, err
	}
	defer e.cleanup()
	if err := e.check(ctx); err != nil {
		return nil, err
	}
	logf("building the services")
	if e.bins, err = buildServices(ctx); err != nil {
		return nil, err
	}
	b := &bench{
		e: e, plan: p, logf: logf, client: newHTTPClient(p.Clients),
		res: &results{Mode: p.Mode, Started: began},
	}
	if b.res.Machine, err = machine(ctx, e); err != nil {
		return nil, err
	}
	steps := []struct {
		name string
		run  func(context.Context) error
	}{
		{"b1", b.baselinePostgres},
		{"b2", b.baselineRabbitMQ},
		{"s1", b.commands},
		{"s2", b.relayDrain},
		{"s3", b.projectionLatency},
		{"s3", b.stopMain},
		{"s4", b.rebuild},
	}
	selected, err := selectSteps(o.Only)
	if err != nil {
		return nil, err
	}
	// A failed scenario does not throw the others' figures away: the run
	// goes on, reports what it measured and the failure, and fails.
	var errs []error
	for _, step := range steps {
		if !selected(step.name) {
			continue
		}
		if err := step.run(ctx); err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			logf("%s failed: %v", strings.ToUpper(step.name), err)
			b.res.Errors = append(b.res.Errors, fmt.Sprintf("%s: %v", step.name, err))
			errs = append(errs, fmt.Errorf("%s: %w", step.name, err))
		}
	}
	b.summarise(p)
	b.res.Duration = time.Since(began)
	b.res.Machine["loadavg_end"] = loadAverage()
	return b.res, errors.Join(errs...)
}

// selectSteps parses -only.
func selectSteps(only string) (func(string) bool, error) {
	if only == "" {
		return func(string) bool { return true }, nil
	}
	set := map[string]bool{}
	for _, name := range strings.Split(only, ",") {
		name = strings.ToLower(strings.TrimSpace(name))
		switch name {
		case "b1", "b2", "s1", "s2", "s3", "s4":
			set[name] = true
		default:
			return nil, fmt.Errorf("-only: unknown scenario %q (b1, b2, s1, s2, s3, s4)", name)
		}
	}
	if set["s3"] && !set["s1"] {
		return nil, errors.New("-only: s3 runs at half of s1's throughput: select s1 too")
	}
	return func(name string) bool { return set[name] }, nil
}

// stopMain stops S1/S3's processes, so the rebuild has the machine to itself.
func (b *bench) stopMain(context.Context) error {
	if b.main == nil {
		return nil
	}
	for _, p := range []*proc{b.main.catalog, b.main.products} {
		if p != nil {
			if err := p.stop(); err != nil {
				return err
			}
		}
	}
	return nil
}

// summarise computes the required top-level figures from the medians.
func (b *bench) summarise(p plan) {
	r := b.res
	b1 := r.median(fmt.Sprintf("b1_pg_command_tx_%d_clients", p.Clients))
	s1 := r.median("s1_command_throughput")
	r.Summary = []summaryValue{
		{"command_throughput_ratio", ratio(s1, b1), fmt.Sprintf("S1 commands/s ÷ B1 transactions/s at %d clients (medians)", p.Clients)},
		{"relay_to_command_ratio", ratio(r.median("s2_relay_drain"), s1), "S2 drain events/s ÷ S1 commands/s (medians); above 1 the relay keeps up"},
		{"projection_latency_p99_ms", r.median("s3_projection_latency_p99"), "S3 commit → applied in the catalog, p99, at half of S1's throughput (median of runs)"},
		{"rebuild_events_per_s", r.median("s4_rebuild"), "S4 full replay into the catalog's shadow model (median)"},
		{"rebuild_vs_naive", ratio(r.median("s4_rebuild"), r.median("s4_naive_rebuild")), "S4 rebuild rate ÷ naive one-transaction-per-event rate (medians)"},
		{"rebuild_peak_rss_mb", math.Max(r.median("s4_peak_rss_products"), r.median("s4_peak_rss_catalog")), "the larger of the products and catalog processes' median peak RSS (VmHWM, MiB) over a rebuild"},
	}
}

// machine describes where the figures were taken: they mean little without it.
func machine(ctx context.Context, e *env) (map[string]any, error) {
	m := map[string]any{
		"nproc":      runtime.NumCPU(),
		"gomaxprocs": runtime.GOMAXPROCS(0),
		"go_version": runtime.Version(),
		"os":         runtime.GOOS + "/" + runtime.GOARCH,
		"time":       time.Now().UTC().Format(time.RFC3339),
	}
	// Other work on the machine shows here: the figures are only as good
	// as the machine was quiet.
	m["loadavg_start"] = loadAverage()
	if h, err := os.Hostname(); err == nil {
		m["hostname"] = h
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				m["mem_total"] = strings.TrimSpace(rest)
			}
		}
	}
	conn, err := pgx.Connect(ctx, e.adminURL)
	if err != nil {
		return nil, fmt.Errorf("machine: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, setting := range []string{"server_version", "synchronous_commit", "shared_buffers", "fsync"} {
		var v string
		if err := conn.QueryRow(ctx, "SELECT current_setting($1)", setting).Scan(&v); err != nil {
			return nil, fmt.Errorf("machine: %s: %w", setting, err)
		}
		m["postgres_"+setting] = v
	}
	ac, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		return nil, fmt.Errorf("machine: %w", err)
	}
	defer ac.Close()
	if v, ok := ac.Properties["version"].(string); ok {
		m["rabbitmq_version"] = v
	}
	return m, nil
}

// loadAverage is /proc/loadavg's 1, 5 and 15 minute averages.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
