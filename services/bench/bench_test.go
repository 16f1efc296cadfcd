package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// requiredKeys are the top-level figures issue 5 asks the JSON for.
var requiredKeys = []string{
	"command_throughput_ratio",
	"relay_to_command_ratio",
	"projection_latency_p99_ms",
	"rebuild_events_per_s",
	"rebuild_vs_naive",
	"rebuild_peak_rss_mb",
}

// requiredFigures are the raw figures behind them.
var requiredFigures = []string{
	"b1_pg_command_tx_1_client", "b1_pg_command_tx_8_clients",
	"b2_amqp_publish_inflight_1", "b2_amqp_publish_inflight_100",
	"s1_command_throughput", "s1_command_latency_p50", "s1_command_latency_p99",
	"s1_outbox_backlog_max", "s1_outbox_backlog_final",
	"s2_relay_drain",
	"s3_projection_latency_p50", "s3_projection_latency_p99",
	"s4_rebuild", "s4_naive_rebuild", "s4_peak_rss_products", "s4_peak_rss_catalog",
}

// TestBenchShort runs the short mode end to end against the real
// PostgreSQL, RabbitMQ and service processes, and checks that the JSON has
// every required figure as a finite number. It asserts nothing about speed:
// CI machines vary, and other tests run alongside.
func TestBenchShort(t *testing.T) {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	// The short mode takes well under a minute; the deadline only stops a
	// hang (a loaded CI machine can be several times slower).
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	began := time.Now()
	res, err := run(ctx, options{Short: true, Log: &testLog{t: t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("short bench took %s", time.Since(began).Round(time.Millisecond))

	out := filepath.Join(t.TempDir(), "bench-results.json")
	if err := writeResults(out, res); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("the results are not JSON: %v\n%s", err, b)
	}
	for _, k := range requiredKeys {
		if !finite(got[k]) {
			t.Errorf("%s = %v, want a finite number", k, got[k])
		}
	}
	figures, ok := got["figures"].(map[string]any)
	if !ok {
		t.Fatalf("figures = %T, want an object", got["figures"])
	}
	for _, name := range requiredFigures {
		f, ok := figures[name].(map[string]any)
		if !ok {
			t.Errorf("figures.%s missing", name)
			continue
		}
		for _, k := range []string{"median", "min", "max"} {
			if !finite(f[k]) {
				t.Errorf("figures.%s.%s = %v, want a finite number", name, k, f[k])
			}
		}
		reps, _ := f["reps"].([]any)
		if len(reps) == 0 {
			t.Errorf("figures.%s.reps is empty", name)
		}
		if u, _ := f["unit"].(string); u == "" {
			t.Errorf("figures.%s has no unit", name)
		}
	}
	machine, _ := got["machine"].(map[string]any)
	if !finite(machine["nproc"]) || machine["go_version"] == nil {
		t.Errorf("machine = %v, want nproc and go_version", machine)
	}

	var table strings.Builder
	if err := printTable(&table, res); err != nil {
		t.Fatal(err)
	}
	for _, k := range requiredKeys {
		if !strings.Contains(table.String(), k) {
			t.Errorf("the table does not show %s:\n%s", k, table.String())
		}
	}
}

func finite(v any) bool {
	f, ok := v.(float64)
	return ok && !math.IsNaN(f) && !math.IsInf(f, 0)
}

// testLog sends the bench's progress lines to t.Log.
type testLog struct {
	t  *testing.T
	mu sync.Mutex
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
