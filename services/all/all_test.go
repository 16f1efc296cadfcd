package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/sandbox"
)

// waitFor bounds every wait: generous, for -race on a small, busy machine.
const waitFor = 60 * time.Second

// binary is services/all, built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "statemill-all-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "statemill")
	cmd := exec.Command("go", "build", "-o", binary, ".")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build services/all:", err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func TestConfigModes(t *testing.T) {
	for _, c := range []struct {
		env  map[string]string
		mode Mode
		err  string
	}{
		{env: nil, mode: Embedded},
		{env: map[string]string{"DATABASE_URL": "postgres://x@h/db", "AMQP_URL": "amqp://h/"}, mode: Services},
		{env: map[string]string{"DATABASE_URL": "postgres://x@h/db"}, err: "DATABASE_URL is set but AMQP_URL is not"},
		{env: map[string]string{"AMQP_URL": "amqp://h/"}, err: "AMQP_URL is set but DATABASE_URL is not"},
		{env: map[string]string{"AMQP_DECLARE": "maybe"}, err: "AMQP_DECLARE"},
	} {
		cfg, err := configFromEnv(func(k string) string { return c.env[k] }, nil)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%v: error %v, want one saying %q", c.env, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", c.env, err)
			continue
		}
		if mode, _ := cfg.Mode(); mode != c.mode {
			t.Errorf("%v: mode %s, want %s", c.env, mode, c.mode)
		}
		if cfg.SQLitePath != DefaultSQLitePath || cfg.HTTPAddr != ":8080" {
			t.Errorf("%v: defaults %q %q", c.env, cfg.SQLitePath, cfg.HTTPAddr)
		}
	}
	cfg, err := configFromEnv(func(k string) string {
		return map[string]string{"SQLITE_PATH": "a.db"}[k]
	}, []string{"-sqlite", ":memory:", "-addr", "127.0.0.1:0"})
	if err != nil || cfg.SQLitePath != ":memory:" || cfg.HTTPAddr != "127.0.0.1:0" {
		t.Fatalf("flags over env: %+v, %v", cfg, err)
	}
}

// With one of the two URLs the process refuses to start and says why.
func TestRefusesWithOneURL(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"DATABASE_URL=postgres://x@127.0.0.1:1/db", "AMQP_URL=amqp://127.0.0.1:1/"} {
		cmd := exec.Command(binary, "-addr", "127.0.0.1:0")
		cmd.Env = []string{v}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Fatalf("%s: %v, want exit code 2", v, err)
		}
		if !strings.Contains(stderr.String(), "set both to use PostgreSQL and RabbitMQ, or neither") {
			t.Fatalf("%s: stderr %q does not say why", v, stderr.String())
		}
	}
}

// process is services/all running as a child process.
type process struct {
	t    *testing.T
	cmd  *exec.Cmd
	base string // the URL it printed, without the trailing slash
	done chan error
}

// start runs the binary in dir with an empty environment (a fresh clone,
// nothing configured) on a port of its own, and waits for the URL it prints.
func start(t *testing.T, dir string) *process {
	t.Helper()
	cmd := exec.Command(binary, "-addr", "127.0.0.1:0")
	cmd.Dir = dir
	cmd.Env = []string{"LOG_LEVEL=warn"}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &process{t: t, cmd: cmd, done: make(chan error, 1)}
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if _, rest, ok := strings.Cut(sc.Text(), "statemill is running at "); ok {
				u, _, _ := strings.Cut(rest, " ")
				urls <- strings.TrimSuffix(u, "/")
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	select {
	case p.base = <-urls:
	case err := <-p.done:
		t.Fatalf("services/all exited before serving: %v", err)
	case <-time.After(waitFor):
		t.Fatal("services/all printed no URL")
	}
	return p
}

// stop sends SIGTERM and waits for a clean exit.
func (p *process) stop() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		p.t.Fatal(err)
	}
	select {
	case err := <-p.done:
		if err != nil {
			p.t.Fatalf("services/all did not stop cleanly: %v", err)
		}
	case <-time.After(waitFor):
		p.t.Fatal("services/all did not stop after SIGTERM")
	}
}

type product struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Inventory int64  `json:"inventory"`
	State     string `json:"state"`
	Version   int64  `json:"version"`
}

// call sends a request and decodes a JSON answer into out (when not nil).
func call(t *testing.T, method, url, body string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	if out != nil && res.StatusCode < 300 {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, url, res.StatusCode, raw, err)
		}
	}
	return res.StatusCode
}

// eventually retries check until it returns nil or waitFor passes.
func eventually(t *testing.T, what string, check func() error) {
	t.Helper()
	deadline := time.After(waitFor)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := check()
		if err == nil {
			return
		}
		select {
		case <-deadline:
			t.Fatalf("%s: %v", what, err)
		case <-tick.C:
		}
	}
}

// catalogShows waits until the catalog holds p at its version.
func catalogShows(t *testing.T, base string, p product) {
	t.Helper()
	eventually(t, "the catalog converges", func() error {
		var list []product
		if code := call(t, "GET", base+"/catalog/products", "", &list); code != http.StatusOK {
			return fmt.Errorf("GET /catalog/products: %d", code)
		}
		for _, c := range list {
			if c.ID == p.ID {
				if c.Version != p.Version || c.State != p.State || c.Inventory != p.Inventory {
					return fmt.Errorf("catalog has %+v, write model %+v", c, p)
				}
				return nil
			}
		}
		return fmt.Errorf("catalog lacks %s", p.ID)
	})
}

// From a fresh directory with no environment: the whole system runs in one
// process, the walkthrough works over HTTP, the catalog converges, the page
// is served and live, a rebuild by replay works, and after SIGTERM and a
// restart the products and their history are still there.
func TestEmbeddedFromScratch(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := start(t, dir)
	base := p.base

	eventually(t, "healthy", func() error {
		if code := call(t, "GET", base+"/healthz", "", nil); code != http.StatusOK {
			return fmt.Errorf("GET /healthz: %d", code)
		}
		return nil
	})
	// The page is served, and its event stream is open before the commands.
	res, err := http.Get(base + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.Contains(string(page), "<html") {
		t.Fatalf("GET /: %d %.100s", res.StatusCode, page)
	}
	stream := openStream(t, base+"/ui/events")

	var lamp product
	if code := call(t, "POST", base+"/api/products", `{"name":"lamp","price":1999}`, &lamp); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	steps := []struct {
		method, body, state string
		inventory           int64
	}{
		{"PUT", `{"adjust_inventory":5}`, "in_stock", 5},
		{"PUT", `{"adjust_inventory":-5}`, "out_of_stock", 0},
		{"PUT", `{"adjust_inventory":2}`, "in_stock", 2},
		{"DELETE", ``, "discontinued", 2},
	}
	for _, s := range steps {
		var got product
		if code := call(t, s.method, base+"/api/products/"+lamp.ID, s.body, &got); code != http.StatusOK {
			t.Fatalf("%s %s: %d", s.method, s.body, code)
		}
		if got.State != s.state || got.Inventory != s.inventory || got.Version != lamp.Version+1 {
			t.Fatalf("%s %s: %+v, want %s with %d at version %d", s.method, s.body, got, s.state, s.inventory, lamp.Version+1)
		}
		lamp = got
	}
	if code := call(t, "PUT", base+"/api/products/"+lamp.ID, `{"adjust_inventory":1}`, nil); code != http.StatusConflict {
		t.Fatalf("adjusting a discontinued product: %d, want 409", code)
	}
	var history []struct {
		Event   string `json:"event"`
		Version int64  `json:"version"`
	}
	if code := call(t, "GET", base+"/api/products/"+lamp.ID+"/history", "", &history); code != http.StatusOK || len(history) != 5 {
		t.Fatalf("history: %d, %d events; want 5", code, len(history))
	}
	catalogShows(t, base, lamp)
	stream.waitFor(t, lamp.ID)

	// A rebuild by replay: the catalog empties and refills from history.
	var rebuild struct {
		ReplayID string `json:"replay_id"`
	}
	if code := call(t, "POST", base+"/catalog/rebuild", "", &rebuild); code != http.StatusAccepted || rebuild.ReplayID == "" {
		t.Fatalf("rebuild: %d %+v", code, rebuild)
	}
	eventually(t, "the rebuild completes", func() error {
		var st struct {
			ReplayIDs []string `json:"replay_ids"`
			Ready     bool     `json:"ready"`
			Replaying bool     `json:"replaying"`
		}
		call(t, "GET", base+"/catalog/status", "", &st)
		if len(st.ReplayIDs) == 0 || st.ReplayIDs[0] != rebuild.ReplayID || st.Replaying {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	catalogShows(t, base, lamp)

	p.stop()
	if _, err := os.Stat(filepath.Join(dir, DefaultSQLitePath)); err != nil {
		t.Fatalf("the embedded database: %v", err)
	}

	again := start(t, dir)
	var got product
	if code := call(t, "GET", again.base+"/api/products/"+lamp.ID, "", &got); code != http.StatusOK || got != lamp {
		t.Fatalf("after a restart: %d %+v, want %+v", code, got, lamp)
	}
	if code := call(t, "GET", again.base+"/api/products/"+lamp.ID+"/history", "", &history); code != http.StatusOK || len(history) != 5 {
		t.Fatalf("history after a restart: %d, %d events", code, len(history))
	}
	catalogShows(t, again.base, lamp)
	again.stop()
}

// stream reads an event stream's data lines.
type stream struct {
	lines chan string
}

func openStream(t *testing.T, url string) *stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Accept", "text/event-stream")
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("open %s: %v", url, err)
	}
	s := &stream{lines: make(chan string, 1024)}
	go func() {
		defer res.Body.Close()
		sc := bufio.NewScanner(res.Body)
		for sc.Scan() {
			select {
			case s.lines <- sc.Text():
			default: // the test reads what it needs; the rest may go
			}
		}
	}()
	return s
}

// waitFor waits for a data line that names id.
func (s *stream) waitFor(t *testing.T, id string) {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case line := <-s.lines:
			if strings.HasPrefix(line, "data:") && strings.Contains(line, id) {
				return
			}
		case <-deadline:
			t.Fatalf("the live page's stream never mentioned %s", id)
		}
	}
}

// With both URLs the process runs on PostgreSQL and RabbitMQ, as the
// separate services do.
func TestServicesMode(t *testing.T) {
	t.Parallel()
	amqpURL, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	name := sandbox.Name("catalog-")
	sandbox.DeleteLater(t,
		[]string{name + ".live", name + ".replay", name + ".dead", topo.UnroutableQueue(), topo.CommandsExchange + ".products.replay_requests", topo.CommandsExchange + ".products.replay_requests.dead"},
		[]string{topo.EventsExchange, topo.CommandsExchange, topo.UnroutableExchange(), name + ".dead"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// The database first: cleanups run last-in first-out, so Run stops
	// before its database is dropped.
	dbURL := sandbox.Postgres(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{
			DatabaseURL: dbURL, AMQPURL: amqpURL, Topology: topo, CatalogName: name,
			Listener: ln, Out: io.Discard,
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitFor):
			t.Error("Run did not stop")
		}
	})
	base := "http://" + ln.Addr().String()
	eventually(t, "healthy", func() error {
		if code := call(t, "GET", base+"/healthz", "", nil); code != http.StatusOK {
			return fmt.Errorf("GET /healthz: %d", code)
		}
		return nil
	})
	var chair product
	if code := call(t, "POST", base+"/api/products", `{"name":"chair","price":5000,"initial_inventory":4}`, &chair); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	catalogShows(t, base, chair)
	var st struct {
		Name             string `json:"name"`
		ActiveGeneration int64  `json:"active_generation"`
	}
	if code := call(t, "GET", base+"/catalog/status", "", &st); code != http.StatusOK || st.Name != name || st.ActiveGeneration == 0 {
		t.Fatalf("the PostgreSQL catalog's status: %d %+v", code, st)
	}
}
