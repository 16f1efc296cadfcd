package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/services/catalog/service"
)

// binaries holds the service binaries the system tests run as processes,
// built once by TestMain.
var binaries = map[string]string{}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "statemill-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, name := range []string{"products", "catalog"} {
		out := filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-o", out, "../"+name)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n", name, err)
			os.Exit(1)
		}
		binaries[name] = out
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one isolated system: a database and a broker namespace shared by a
// products process and the catalogs under test.
type env struct {
	t        *testing.T
	dbURL    string
	amqpURL  string
	topology broker.Topology
	products string // base URL of the products service
}

func newEnv(t *testing.T) *env {
	t.Helper()
	amqpURL, ns := sandbox.Broker(t)
	e := &env{t: t, dbURL: sandbox.Postgres(t), amqpURL: amqpURL,
		topology: broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}}
	sandbox.DeleteLater(t, []string{e.topology.UnroutableQueue(), "products.replay_requests"},
		[]string{e.topology.EventsExchange, e.topology.UnroutableExchange(), e.topology.CommandsExchange})
	p := e.process("products", nil)
	e.products = p.base
	return e
}

func (e *env) environ(extra map[string]string) []string {
	vars := map[string]string{
		"DATABASE_URL": e.dbURL, "AMQP_URL": e.amqpURL, "HTTP_ADDR": "127.0.0.1:0",
		"EVENTS_EXCHANGE": e.topology.EventsExchange, "COMMANDS_EXCHANGE": e.topology.CommandsExchange,
		"LOG_LEVEL": "info",
	}
	for k, v := range extra {
		vars[k] = v
	}
	out := os.Environ()
	for k, v := range vars {
		out = append(out, k+"="+v)
	}
	return out
}

// process is a service binary running as a child process.
type process struct {
	cmd  *exec.Cmd
	base string
	done chan struct{}

	mu  sync.Mutex
	log []string // its last log lines, shown when the test fails
}

func (p *process) remember(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.log) == 200 {
		p.log = p.log[1:]
	}
	p.log = append(p.log, line)
}

// process starts a service binary and waits until it serves HTTP.
func (e *env) process(name string, extra map[string]string, args ...string) *process {
	e.t.Helper()
	cmd := exec.Command(binaries[name], args...)
	cmd.Env = e.environ(extra)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var line struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && strings.HasSuffix(line.Msg, "listening") && line.Addr != "" {
				select {
				case addr <- line.Addr:
				default:
				}
			}
			p.remember(name + ": " + sc.Text())
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	e.t.Cleanup(func() {
		p.stop(e.t)
		if e.t.Failed() {
			p.mu.Lock()
			defer p.mu.Unlock()
			e.t.Logf("last log lines of %s:\n%s", name, strings.Join(p.log, "\n"))
		}
	})
	select {
	case a := <-addr:
		p.base = "http://" + a
	case <-p.done:
		e.t.Fatalf("%s exited before it listened", name)
	case <-time.After(60 * time.Second):
		e.t.Fatalf("%s did not listen within 60s", name)
	}
	eventually(e.t, 60*time.Second, name+" healthy", func() bool {
		res, err := http.Get(p.base + "/healthz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	return p
}

// stop sends SIGTERM and waits; kill sends SIGKILL.
func (p *process) stop(t *testing.T) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Errorf("%s ignored SIGTERM for 30s", p.cmd.Path)
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *process) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// catalog runs a catalog in process (Run on port 0) under a unique worker
// name, with a database of its own (a service owns its read model); it
// returns its base URL and a function that stops it.
func (e *env) catalog(name string, rebuild bool) (string, func()) {
	e.t.Helper()
	dbURL := sandbox.Postgres(e.t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	sandbox.DeleteLater(e.t, []string{name + ".live", name + ".replay", name + ".dead"}, []string{name + ".dead"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	go func() {
		done <- service.Run(ctx, service.Config{
			DatabaseURL: dbURL, AMQPURL: e.amqpURL, Topology: e.topology, Name: name,
			RebuildAtStart: rebuild, Listener: ln, DBMaxConns: 6, RebuildTimeout: 2 * time.Minute,
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
		})
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					e.t.Errorf("catalog Run: %v", err)
				}
			case <-time.After(30 * time.Second):
				e.t.Error("catalog did not stop within 30s")
			}
		})
	}
	e.t.Cleanup(stop)
	base := "http://" + ln.Addr().String()
	eventually(e.t, 30*time.Second, "catalog healthy", func() bool {
		res, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	return base, stop
}

// call sends a JSON request and decodes a JSON response into out (if not nil).
func call(t *testing.T, method, url, body string, out any) int {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if out != nil && res.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: decode %s: %v", method, url, b, err)
		}
	}
	return res.StatusCode
}

// state is what a product looks like to a convergence check.
type state struct {
	ID        string `json:"id"`
	State     string `json:"state"`
	Inventory int64  `json:"inventory"`
	Version   int64  `json:"version"`
}

// writeModel reads the products table directly.
func (e *env) writeModel(t *testing.T) map[string]state {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(context.Background(), `SELECT id::text, state, inventory, version FROM products`)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]state{}
	for rows.Next() {
		var s state
		if err := rows.Scan(&s.ID, &s.State, &s.Inventory, &s.Version); err != nil {
			t.Fatal(err)
		}
		got[s.ID] = s
	}
	return got
}

// catalogModel reads the catalog's product list.
func catalogModel(t *testing.T, base string) (map[string]state, int) {
	t.Helper()
	var list []state
	status := call(t, "GET", base+"/catalog/products", "", &list)
	got := map[string]state{}
	for _, s := range list {
		got[s.ID] = s
	}
	return got, status
}

// converged reports whether the catalog equals the write model.
func converged(want, got map[string]state) bool {
	if len(want) != len(got) {
		return false
	}
	for id, w := range want {
		if got[id] != w {
			return false
		}
	}
	return true
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}
