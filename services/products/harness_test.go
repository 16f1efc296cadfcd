package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/services/products/service"
)

// system is one products service booted by Run on port 0, against its own
// database and exchanges.
type system struct {
	t        *testing.T
	base     string
	dbURL    string
	amqpURL  string
	topology broker.Topology
	stop     context.CancelFunc
	done     chan error
}

type options struct {
	databaseURL string // default: a fresh sandbox database
}

func start(t *testing.T, opts ...func(*options)) *system {
	t.Helper()
	var o options
	for _, f := range opts {
		f(&o)
	}
	dbURL := o.databaseURL
	if dbURL == "" {
		dbURL = sandbox.Postgres(t)
	}
	amqpURL, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	sandbox.DeleteLater(t, []string{topo.UnroutableQueue()}, []string{topo.EventsExchange, topo.UnroutableExchange(), topo.CommandsExchange})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &system{t: t, base: "http://" + ln.Addr().String(), dbURL: dbURL, amqpURL: amqpURL, topology: topo, stop: cancel, done: make(chan error, 1)}
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	go func() {
		s.done <- service.Run(ctx, service.Config{
			DatabaseURL: dbURL, AMQPURL: amqpURL, Topology: topo, Listener: ln,
			DBMaxConns: 6, ShutdownTimeout: 10 * time.Second,
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
		})
	}()
	t.Cleanup(func() { s.shutdown() })
	eventually(t, 30*time.Second, "service healthy", func() bool {
		select {
		case err := <-s.done:
			t.Fatalf("Run returned early: %v", err)
		default:
		}
		res, err := http.Get(s.base + "/healthz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	return s
}

// shutdown stops the service as SIGTERM would and returns Run's error.
func (s *system) shutdown() error {
	if s.stop == nil {
		return nil
	}
	s.stop()
	s.stop = nil
	select {
	case err := <-s.done:
		return err
	case <-time.After(30 * time.Second):
		s.t.Error("Run did not return within 30s of cancellation")
		return errors.New("timeout")
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

func (r response) product(t *testing.T) product {
	t.Helper()
	var p product
	r.json(t, &p)
	return p
}

// problem decodes a problem-details body and checks its content type.
func (r response) problem(t *testing.T) problem {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("content type %q, want application/problem+json (status %d, body %s)", ct, r.status, r.body)
	}
	var p problem
	r.json(t, &p)
	if p.Status != r.status {
		t.Fatalf("problem status %d, response status %d", p.Status, r.status)
	}
	return p
}

type product struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Price     int64     `json:"price"`
	Inventory int64     `json:"inventory"`
	State     string    `json:"state"`
	Version   int64     `json:"version"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

type problem struct {
	Type   string            `json:"type"`
	Title  string            `json:"title"`
	Status int               `json:"status"`
	Detail string            `json:"detail"`
	Errors map[string]string `json:"errors"`
}

// do sends a request; header pairs follow the body.
func (s *system) do(method, path, body string, header ...string) response {
	s.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.base+path, rd)
	if err != nil {
		s.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		if header[i+1] == "" {
			req.Header.Del(header[i])
			continue
		}
		req.Header.Set(header[i], header[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return response{status: res.StatusCode, header: res.Header, body: b}
}

func (s *system) create(name string, price, inventory int64) product {
	s.t.Helper()
	r := s.do("POST", "/api/products", mustJSON(map[string]any{"name": name, "price": price, "initial_inventory": inventory}))
	if r.status != http.StatusCreated {
		s.t.Fatalf("create %s: %d %s", name, r.status, r.body)
	}
	return r.product(s.t)
}

func (s *system) adjust(id string, n int64) response {
	s.t.Helper()
	return s.do("PUT", "/api/products/"+id, mustJSON(map[string]any{"adjust_inventory": n}))
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// observer is a plain amqp091 consumer bound to the events exchange: it
// sees what a projection would.
type observer struct {
	mu         sync.Mutex
	deliveries []amqp091.Delivery
}

func (s *system) observe(bindings ...string) *observer {
	s.t.Helper()
	conn, err := amqp091.Dial(s.amqpURL)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		s.t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	for _, b := range bindings {
		if err := ch.QueueBind(q.Name, b, s.topology.EventsExchange, false, nil); err != nil {
			s.t.Fatal(err)
		}
	}
	msgs, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	o := &observer{}
	go func() {
		for d := range msgs {
			o.mu.Lock()
			o.deliveries = append(o.deliveries, d)
			o.mu.Unlock()
		}
	}()
	return o
}

func (o *observer) snapshot() []amqp091.Delivery {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]amqp091.Delivery(nil), o.deliveries...)
}

// wait returns once n deliveries arrived, failing after the deadline.
func (o *observer) wait(t *testing.T, n int) []amqp091.Delivery {
	t.Helper()
	eventually(t, 20*time.Second, "deliveries", func() bool { return len(o.snapshot()) >= n })
	return o.snapshot()
}

func decodeEvent(t *testing.T, d amqp091.Delivery) envelope.Event {
	t.Helper()
	e, err := envelope.Decode(d.Body)
	if err != nil {
		t.Fatalf("decode %s: %v", d.Body, err)
	}
	return e
}

// eventually polls cond until it holds, failing t after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

func stringsReader(s string) io.Reader {
	if s == "" {
		return nil
	}
	return strings.NewReader(s)
}
