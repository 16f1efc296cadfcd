package service

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

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/projections/liveview"
)

// waitFor bounds every wait on a condition.
const waitFor = 30 * time.Second

// productsBinary is the products service, built once by TestMain: the ui's
// tests run it as a child process, like a deployment would.
var productsBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "statemill-ui-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	productsBinary = filepath.Join(dir, "products")
	cmd := exec.Command("go", "build", "-o", productsBinary, "../../products")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build products: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one isolated system: a database and a broker namespace for a
// products process, and the ui instances under test.
type env struct {
	t        *testing.T
	amqpURL  string
	topology broker.Topology
	products string // base URL of the products service
}

func newEnv(t *testing.T) *env {
	t.Helper()
	amqpURL, ns := sandbox.Broker(t)
	e := &env{t: t, amqpURL: amqpURL,
		topology: broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}}
	requests := e.topology.CommandsExchange + ".products.replay_requests"
	sandbox.DeleteLater(t, []string{e.topology.UnroutableQueue(), requests, requests + ".dead"},
		[]string{e.topology.EventsExchange, e.topology.UnroutableExchange(), e.topology.CommandsExchange})
	e.products = e.startProducts(sandbox.Postgres(t))
	return e
}

// startProducts runs the products service on dbURL and waits until it is
// healthy.
func (e *env) startProducts(dbURL string) string {
	t := e.t
	t.Helper()
	cmd := exec.Command(productsBinary)
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+dbURL, "AMQP_URL="+e.amqpURL, "HTTP_ADDR=127.0.0.1:0",
		"EVENTS_EXCHANGE="+e.topology.EventsExchange, "COMMANDS_EXCHANGE="+e.topology.CommandsExchange, "LOG_LEVEL=info")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	addr := make(chan string, 1)
	var mu sync.Mutex
	var lines []string
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
			mu.Lock()
			if len(lines) == 100 {
				lines = lines[1:]
			}
			lines = append(lines, sc.Text())
			mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(waitFor):
			t.Errorf("products ignored SIGTERM for %s", waitFor)
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			mu.Lock()
			t.Logf("last log lines of products:\n%s", strings.Join(lines, "\n"))
			mu.Unlock()
		}
	})
	var base string
	select {
	case a := <-addr:
		base = "http://" + a
	case <-done:
		t.Fatal("products exited before it listened")
	case <-time.After(60 * time.Second):
		t.Fatal("products did not listen within 60s")
	}
	waitHealthy(t, base)
	return base
}

func waitHealthy(t *testing.T, base string) {
	t.Helper()
	eventually(t, 60*time.Second, base+" healthy", func() string {
		res, err := http.Get(base + "/healthz")
		if err != nil {
			return err.Error()
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Sprintf("%d %s", res.StatusCode, b)
		}
		return ""
	})
}

// uiInstance is a ui running in process.
type uiInstance struct {
	base   string
	prefix string
	stop   func()
}

// startUI runs the ui in process on port 0 with a prefix of its own, and
// waits until it is healthy (its first replay is complete).
func (e *env) startUI(edit ...func(*Config)) *uiInstance {
	t := e.t
	t.Helper()
	prefix, err := projection.InstancePrefix("ui")
	if err != nil {
		t.Fatal(err)
	}
	sandbox.DeleteLater(t, []string{prefix}, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	cfg := Config{
		AMQPURL: e.amqpURL, Topology: e.topology, ProductsURL: e.products, Prefix: prefix,
		Listener: ln, QueueExpires: 10 * time.Second,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	for _, f := range edit {
		f(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("ui Run: %v", err)
				}
			case <-time.After(waitFor):
				t.Errorf("the ui did not stop within %s", waitFor)
			}
		})
	}
	t.Cleanup(stop)
	u := &uiInstance{base: "http://" + ln.Addr().String(), prefix: prefix, stop: stop}
	waitHealthy(t, u.base)
	return u
}

// product is the products API's product.
type product struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Price     int64  `json:"price"`
	Inventory int64  `json:"inventory"`
	State     string `json:"state"`
	Version   int64  `json:"version"`
}

func (e *env) create(name string, price, inventory int64) product {
	e.t.Helper()
	var p product
	body := fmt.Sprintf(`{"name":%q,"price":%d,"initial_inventory":%d}`, name, price, inventory)
	if code := call(e.t, "POST", e.products+"/api/products", body, &p); code != http.StatusCreated {
		e.t.Fatalf("create %s: %d", name, code)
	}
	return p
}

func (e *env) adjust(id string, n int64) product {
	e.t.Helper()
	var p product
	if code := call(e.t, "PUT", e.products+"/api/products/"+id, fmt.Sprintf(`{"adjust_inventory":%d}`, n), &p); code != http.StatusOK {
		e.t.Fatalf("adjust %s by %d: %d", id, n, code)
	}
	return p
}

func (e *env) discontinue(id string) product {
	e.t.Helper()
	var p product
	if code := call(e.t, "DELETE", e.products+"/api/products/"+id, "", &p); code != http.StatusOK {
		e.t.Fatalf("discontinue %s: %d", id, code)
	}
	return p
}

// listing is GET /ui/products.
type uiListing struct {
	liveview.Snapshot
	Status liveview.Status `json:"status"`
}

func (u *uiInstance) listing(t *testing.T) uiListing {
	t.Helper()
	var l uiListing
	if code := call(t, "GET", u.base+"/ui/products", "", &l); code != http.StatusOK {
		t.Fatalf("GET /ui/products: %d", code)
	}
	return l
}

// waitProduct waits until the ui shows product id at version.
func (u *uiInstance) waitProduct(t *testing.T, id string, version int64) liveview.Product {
	t.Helper()
	var got liveview.Product
	eventually(t, waitFor, fmt.Sprintf("the ui shows %s at version %d", id, version), func() string {
		for _, p := range u.listing(t).Products {
			if p.ID == id {
				got = p
				if p.Version == version {
					return ""
				}
				return fmt.Sprintf("at version %d", p.Version)
			}
		}
		return "not there"
	})
	return got
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
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
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

// eventually polls cond until it returns "" or timeout passes, then fails
// with its last explanation.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		why := cond()
		if why == "" {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("%s: not within %s: %s", what, timeout, why)
		case <-tick.C:
		}
	}
}

// ---- a server-sent events client ----

type sseEvent struct {
	Event, ID, Data string
}

type sseClient struct {
	t        testing.TB
	cancel   context.CancelFunc
	events   chan sseEvent
	done     chan struct{} // closed when the stream ended
	mu       sync.Mutex
	comments int
	retry    string
	header   http.Header
}

// openSSE opens an event stream; lastID, when set, goes in Last-Event-ID.
func openSSE(t testing.TB, url, lastID string) *sseClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("open %s: %v", url, err)
	}
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		cancel()
		t.Fatalf("open %s: %d %s", url, res.StatusCode, res.Header.Get("Content-Type"))
	}
	c := &sseClient{t: t, cancel: cancel, events: make(chan sseEvent, 4096), done: make(chan struct{}), header: res.Header}
	t.Cleanup(c.close)
	go func() {
		defer close(c.done)
		defer res.Body.Close()
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		var ev sseEvent
		var data []string
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if len(data) > 0 || ev.Event != "" {
					ev.Data = strings.Join(data, "\n")
					c.events <- ev
				}
				ev, data = sseEvent{}, nil
			case strings.HasPrefix(line, ":"):
				c.mu.Lock()
				c.comments++
				c.mu.Unlock()
			default:
				field, value, _ := strings.Cut(line, ":")
				value = strings.TrimPrefix(value, " ")
				switch field {
				case "event":
					ev.Event = value
				case "id":
					ev.ID = value
				case "data":
					data = append(data, value)
				case "retry":
					c.mu.Lock()
					c.retry = value
					c.mu.Unlock()
				}
			}
		}
	}()
	return c
}

func (c *sseClient) close() { c.cancel() }

func (c *sseClient) retryField() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.retry
}

func (c *sseClient) commentCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.comments
}

// next returns the next event that is not a status, within waitFor.
func (c *sseClient) next() sseEvent {
	c.t.Helper()
	deadline := time.NewTimer(waitFor)
	defer deadline.Stop()
	for {
		select {
		case ev := <-c.events:
			if ev.Event == "status" {
				continue
			}
			return ev
		case <-c.done:
			select {
			case ev := <-c.events:
				if ev.Event != "status" {
					return ev
				}
				continue
			default:
			}
			c.t.Fatal("the event stream ended")
		case <-deadline.C:
			c.t.Fatalf("no event within %s", waitFor)
		}
	}
}

// nextStatus returns the next status event, skipping others.
func (c *sseClient) nextStatus() liveview.Status {
	c.t.Helper()
	deadline := time.NewTimer(waitFor)
	defer deadline.Stop()
	for {
		select {
		case ev := <-c.events:
			if ev.Event != "status" {
				continue
			}
			var st liveview.Status
			if err := json.Unmarshal([]byte(ev.Data), &st); err != nil {
				c.t.Fatalf("status %q: %v", ev.Data, err)
			}
			return st
		case <-deadline.C:
			c.t.Fatalf("no status event within %s", waitFor)
		}
	}
}

func (c *sseClient) snapshot() (sseEvent, liveview.Snapshot) {
	c.t.Helper()
	ev := c.next()
	if ev.Event != "snapshot" {
		c.t.Fatalf("got %s %s, want a snapshot", ev.Event, ev.ID)
	}
	var s liveview.Snapshot
	if err := json.Unmarshal([]byte(ev.Data), &s); err != nil {
		c.t.Fatalf("snapshot %q: %v", ev.Data, err)
	}
	return ev, s
}

func (c *sseClient) change() (sseEvent, liveview.Change) {
	c.t.Helper()
	ev := c.next()
	if ev.Event != "change" {
		c.t.Fatalf("got %s %s, want a change", ev.Event, ev.ID)
	}
	var ch liveview.Change
	if err := json.Unmarshal([]byte(ev.Data), &ch); err != nil {
		c.t.Fatalf("change %q: %v", ev.Data, err)
	}
	return ev, ch
}

// waitEnded waits until the server ended the stream.
func (c *sseClient) waitEnded(within time.Duration) bool {
	select {
	case <-c.done:
		return true
	case <-time.After(within):
		return false
	}
}
