//go:build faults

// The tests of this package start a private PostgreSQL cluster and
// RabbitMQ node (as root they run PostgreSQL as the postgres OS user), take
// minutes, and inject faults, so they build only with the tag `faults`:
// `make faults-short` runs them, as its own CI step after `make test`.
// There, a missing server binary or any failure fails them.

package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// logWriter sends the suite's progress to the test log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestFaultsShort runs every scenario in short mode and checks the JSON
// report: nothing lost, nothing applied twice, every model converged.
func TestFaultsShort(t *testing.T) {
	t.Parallel() // each test has servers of its own
	out := os.Getenv("FAULTS_OUT")
	if out == "" {
		out = filepath.Join(t.TempDir(), "faults-results.json")
	}
	rep, err := runSuite(t.Context(), options{Short: true, Out: out, Progress: logWriter{t}})
	if rep != nil && len(rep.Scenarios) > 0 {
		var table strings.Builder
		printTable(&table, rep)
		t.Log("\n" + table.String())
		if werr := writeReport(out, rep); werr != nil {
			t.Fatal(werr)
		}
	}
	if err != nil {
		t.Fatal(err)
	}

	// Read the report back as a consumer of $FAULTS_OUT would.
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Scenarios []map[string]any `json:"scenarios"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if want := len(scenarios()); len(got.Scenarios) != want {
		t.Fatalf("the report has %d scenarios, want %d", len(got.Scenarios), want)
	}
	for _, sc := range got.Scenarios {
		name, _ := sc["name"].(string)
		for _, key := range []string{"name", "attempted", "acknowledged", "history_rows", "events_published", "events_applied", "lost", "duplicates_applied", "converged"} {
			if _, ok := sc[key]; !ok {
				t.Errorf("%s: the report has no %q", name, key)
			}
		}
		if applied, _ := sc["events_applied"].(map[string]any); applied["catalog"] == nil {
			t.Errorf("%s: events_applied has no catalog", name)
		}
		if sc["lost"] != float64(0) {
			t.Errorf("%s: lost = %v, want 0", name, sc["lost"])
		}
		if sc["duplicates_applied"] != float64(0) {
			t.Errorf("%s: duplicates_applied = %v, want 0", name, sc["duplicates_applied"])
		}
		if sc["converged"] != true {
			t.Errorf("%s: converged = %v", name, sc["converged"])
		}
		if sc["acknowledged"] == float64(0) {
			t.Errorf("%s: nothing was acknowledged", name)
		}
		if sc["ok"] != true {
			t.Errorf("%s failed: %v", name, sc["failures"])
		}
	}
}
