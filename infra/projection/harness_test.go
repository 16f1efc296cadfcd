package projection_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/membroker"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

// waitFor bounds every wait on a condition.
const waitFor = 30 * time.Second

// eventually polls cond until it returns "" (met) or timeout passes, then
// fails with cond's last explanation.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %s", what, timeout, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// testLogger logs through t while the test runs, and not after.
func testLogger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

var _ io.Writer = (*testWriter)(nil)

// ---- the test projection: widgets ----

// widgets is a small read model: one row per (generation, widget) with the
// newest version and its state. An event whose attributes say
// {"fail": true} is refused (a permanent failure).
type widgets struct {
	mu    sync.Mutex
	hook  func(gen int64, events []envelope.Event) error // runs first in Apply, when set
	calls map[int64]map[string]int                       // generation → event id → times handed over
}

func newWidgets() *widgets { return &widgets{calls: map[int64]map[string]int{}} }

func (p *widgets) setHook(h func(gen int64, events []envelope.Event) error) {
	p.mu.Lock()
	p.hook = h
	p.mu.Unlock()
}

// handed is how many times events with these ids were handed to gen.
func (p *widgets) handed(gen int64, ids []string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, id := range ids {
		n += p.calls[gen][id]
	}
	return n
}

func (p *widgets) Apply(ctx context.Context, tx pgx.Tx, gen int64, events []envelope.Event) error {
	p.mu.Lock()
	hook := p.hook
	p.mu.Unlock()
	if hook != nil {
		if err := hook(gen, events); err != nil {
			return err
		}
	}
	newest := map[string]envelope.Event{}
	for _, e := range events {
		var a struct {
			Fail bool `json:"fail"`
		}
		_ = json.Unmarshal(e.Attributes, &a)
		if a.Fail {
			return apperr.Errorf(apperr.Invalid, "widget event %s is refused", e.ID)
		}
		if cur, ok := newest[e.EntityID]; !ok || e.Version > cur.Version {
			newest[e.EntityID] = e
		}
	}
	var ids, states []string
	var versions []int64
	for _, e := range newest {
		ids, versions, states = append(ids, e.EntityID), append(versions, e.Version), append(states, e.To)
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO widgets AS w (generation, id, version, state)
		SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::text[])
		ON CONFLICT (generation, id) DO UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state
		WHERE w.version < EXCLUDED.version`, gen, ids, versions, states); err != nil {
		return err
	}
	p.mu.Lock()
	if p.calls[gen] == nil {
		p.calls[gen] = map[string]int{}
	}
	for _, e := range events {
		p.calls[gen][e.ID]++
	}
	p.mu.Unlock()
	return nil
}

func (p *widgets) Clear(ctx context.Context, tx pgx.Tx, gen int64) error {
	_, err := tx.Exec(ctx, `DELETE FROM widgets WHERE generation = $1`, gen)
	return err
}

// ---- events ----

// widgetHistory returns the transitions 1..n of widget id: create, then
// paint; the state after version v is "s<v>".
func widgetHistory(id string, n int) []envelope.Event {
	evs := make([]envelope.Event, 0, n)
	for v := 1; v <= n; v++ {
		evs = append(evs, widgetEvent(id, int64(v), false))
	}
	return evs
}

func widgetEvent(id string, version int64, fail bool) envelope.Event {
	name, from := "paint", fmt.Sprintf("s%d", version-1)
	if version == 1 {
		name, from = "create", "initialized"
	}
	to := fmt.Sprintf("s%d", version)
	attrs, _ := json.Marshal(map[string]any{"id": id, "state": to, "fail": fail})
	return envelope.Event{
		ID: uuid.Must(uuid.NewV7()).String(), SchemaVersion: 1, EntityType: "widget", EntityID: id,
		Version: version, Event: name, From: from, To: to, Attributes: attrs,
		OccurredAt: time.Now().UTC().Truncate(time.Microsecond), CorrelationID: "test",
	}
}

func ids(evs []envelope.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.ID
	}
	return out
}

// ---- the environment: database, broker, fake replay producer ----

type env struct {
	t       testing.TB
	dbURL   string
	db      *pgxpool.Pool
	amqpURL string        // RabbitMQ; "" on the in-process broker
	dial    broker.Dialer // the in-process broker's; nil on RabbitMQ (workers dial AMQPURL)
	ns      string
	topo    broker.Topology

	pubMu sync.Mutex
	pub   broker.Channel // confirm mode
	conn  broker.Conn

	requests chan replay.Request // what the fake replay producer received
}

// newEnv is an environment on RabbitMQ.
func newEnv(t testing.TB) *env { return newEnvOn(t, false) }

// newMemEnv is an environment on the in-process broker of the embedded
// mode (membroker); the read model is still PostgreSQL.
func newMemEnv(t testing.TB) *env { return newEnvOn(t, true) }

// onEachBroker runs test in parallel on RabbitMQ and on the in-process
// broker, each with an environment of its own.
func onEachBroker(t *testing.T, test func(t *testing.T, e *env)) {
	t.Parallel()
	for _, b := range []struct {
		name   string
		newEnv func(testing.TB) *env
	}{{"rabbitmq", newEnv}, {"inprocess", newMemEnv}} {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			test(t, b.newEnv(t))
		})
	}
}

func newEnvOn(t testing.TB, inProcess bool) *env {
	t.Helper()
	ctx := testCtx(t)
	e := &env{t: t, dbURL: sandbox.Postgres(t), requests: make(chan replay.Request, 16)}
	e.db = openPool(t, e.dbURL, 2)
	if _, err := e.db.Exec(ctx, `CREATE TABLE widgets (
		generation bigint NOT NULL, id text NOT NULL, version bigint NOT NULL, state text NOT NULL,
		PRIMARY KEY (generation, id))`); err != nil {
		t.Fatal(err)
	}

	if inProcess {
		mb, err := membroker.New(membroker.Config{Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = mb.Close() })
		e.dial, e.ns = mb.Dialer(), sandbox.Name("t")
	} else {
		e.amqpURL, e.ns = sandbox.Broker(t)
	}
	e.topo = broker.Topology{EventsExchange: e.ns + ".events", CommandsExchange: e.ns + ".commands"}
	requestQueue := e.ns + ".replay_requests"
	e.deleteLater(t, []string{e.topo.UnroutableQueue(), requestQueue},
		[]string{e.topo.EventsExchange, e.topo.CommandsExchange, e.topo.UnroutableExchange()})
	dial := e.dial
	if dial == nil {
		dial = broker.AMQPDialer(e.amqpURL)
	}
	conn, err := dial("projection test " + e.ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	e.conn = conn
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := broker.DeclareShared(ch, e.topo); err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	e.pub = ch

	// The fake replay producer: it only receives requests; each test
	// publishes the replay it wants, in the order it wants.
	pc, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pc.QueueDeclare(requestQueue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := pc.QueueBind(requestQueue, replay.RequestRoutingKey, e.topo.CommandsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := pc.Consume(requestQueue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for d := range deliveries {
			var req replay.Request
			if err := json.Unmarshal(d.Body, &req); err != nil || d.MessageId != req.ReplayID || d.ContentType != "application/json" {
				req = replay.Request{ReplayID: "malformed: " + string(d.Body)}
			}
			e.requests <- req
		}
	}()
	return e
}

// deleteLater deletes RabbitMQ objects when t ends; the in-process broker
// goes as a whole.
func (e *env) deleteLater(t testing.TB, queues, exchanges []string) {
	t.Helper()
	if e.dial == nil {
		sandbox.DeleteLater(t, queues, exchanges)
	}
}

func openPool(t testing.TB, dbURL string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	pool, err := pgstore.Open(testCtx(t), pgstore.PoolConfig{URL: dbURL, MaxConns: maxConns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// nextRequest returns the next replay request the fake producer received.
func (e *env) nextRequest(t testing.TB) replay.Request {
	t.Helper()
	select {
	case req := <-e.requests:
		if strings.HasPrefix(req.ReplayID, "malformed") {
			t.Fatalf("replay request: %s", req.ReplayID)
		}
		return req
	case <-time.After(waitFor):
		t.Fatal("no replay request arrived")
		return replay.Request{}
	}
}

// publish publishes messages with confirms, pipelined.
func (e *env) publish(t testing.TB, msgs ...msg) {
	t.Helper()
	e.pubMu.Lock()
	defer e.pubMu.Unlock()
	ctx := testCtx(t)
	var confirms []broker.Confirmation
	for _, m := range msgs {
		m.p.DeliveryMode = amqp091.Persistent
		if m.p.ContentType == "" {
			m.p.ContentType = "application/json"
		}
		dc, err := e.pub.Publish(ctx, e.topo.EventsExchange, m.key, false, m.p)
		if err != nil {
			t.Fatalf("publish %s: %v", m.key, err)
		}
		confirms = append(confirms, dc)
	}
	for _, dc := range confirms {
		select {
		case <-dc.Done():
		case <-ctx.Done():
			t.Fatalf("publish not confirmed: %v", ctx.Err())
		}
		if !dc.Acked() {
			t.Fatal("publish not confirmed: nacked")
		}
	}
}

type msg struct {
	key string
	p   amqp091.Publishing
}

func eventMsg(key string, ev envelope.Event, headers amqp091.Table) msg {
	body, _ := json.Marshal(ev)
	if headers == nil {
		headers = amqp091.Table{}
	}
	headers[envelope.HeaderCorrelationID] = ev.CorrelationID
	if _, ok := headers[envelope.HeaderSchemaVersion]; !ok {
		headers[envelope.HeaderSchemaVersion] = "1"
	}
	return msg{key: key, p: amqp091.Publishing{MessageId: ev.ID, Headers: headers, Body: body}}
}

func liveMsgs(evs ...envelope.Event) []msg {
	out := make([]msg, len(evs))
	for i, ev := range evs {
		out[i] = eventMsg(ev.RoutingKey(), ev, nil)
	}
	return out
}

func (e *env) publishLive(t testing.TB, evs ...envelope.Event) {
	t.Helper()
	e.publish(t, liveMsgs(evs...)...)
}

// replayMsgs are evs replayed under prefix for replay id.
func replayMsgs(prefix, replayID string, evs ...envelope.Event) []msg {
	out := make([]msg, len(evs))
	for i, ev := range evs {
		out[i] = eventMsg(envelope.ReplayRoutingKey(prefix, ev.EntityType, ev.Event), ev,
			amqp091.Table{envelope.HeaderReplayID: replayID})
	}
	return out
}

func startedMsg(prefix, replayID string, expected int64) msg {
	body, _ := json.Marshal(replay.Started{ReplayID: replayID, ExpectedCount: expected})
	return msg{key: envelope.ReplayRoutingKey(prefix, "widget", replay.StartedEvent),
		p: amqp091.Publishing{MessageId: uuid.NewString(), Headers: amqp091.Table{envelope.HeaderReplayID: replayID}, Body: body}}
}

func completedMsg(prefix, replayID string, count int64, cursor string) msg {
	body, _ := json.Marshal(replay.Completed{ReplayID: replayID, Count: count, Cursor: cursor})
	return msg{key: envelope.ReplayRoutingKey(prefix, "widget", replay.CompletedEvent),
		p: amqp091.Publishing{MessageId: uuid.NewString(), Headers: amqp091.Table{envelope.HeaderReplayID: replayID}, Body: body}}
}

func cursor(n int) string {
	return replay.Cursor{Snapshot: fmt.Sprintf("%d:%d:", n, n)}.String()
}

// batchMsgs are evs as replay_batch messages of up to size events each.
func batchMsgs(prefix, replayID string, size int, evs ...envelope.Event) []msg {
	var out []msg
	for chunk := range slices.Chunk(evs, size) {
		body, _ := envelope.EncodeBatch(chunk)
		out = append(out, msg{key: envelope.ReplayRoutingKey(prefix, "widget", replay.BatchEvent),
			p: amqp091.Publishing{MessageId: uuid.NewString(), Type: replay.BatchEvent,
				Headers: amqp091.Table{envelope.HeaderReplayID: replayID}, Body: body}})
	}
	return out
}

// serveReplay answers req completely, as the responder would: started,
// every event (in messages of up to req.Batch events), completed.
func (e *env) serveReplay(t testing.TB, req replay.Request, evs []envelope.Event, cur string) {
	t.Helper()
	msgs := []msg{startedMsg(req.Prefix, req.ReplayID, int64(len(evs)))}
	if req.Batch > 1 {
		msgs = append(msgs, batchMsgs(req.Prefix, req.ReplayID, req.Batch, evs...)...)
	} else {
		msgs = append(msgs, replayMsgs(req.Prefix, req.ReplayID, evs...)...)
	}
	msgs = append(msgs, completedMsg(req.Prefix, req.ReplayID, int64(len(evs)), cur))
	e.publish(t, msgs...)
}

// ---- workers ----

type testWorker struct {
	*projection.Worker
	name   string
	schema string
	proj   *widgets
	reg    *prometheus.Registry
	stop   func() // stops Run and checks it returned nil
}

type workerOpt func(*projection.Config)

// startWorker runs a worker named name (a fresh name when "") on e until the
// test ends or stop is called, and waits until it consumes.
func (e *env) startWorker(t testing.TB, name string, opts ...workerOpt) *testWorker {
	t.Helper()
	if name == "" {
		name = sandbox.Name("w")
	}
	e.deleteLater(t, []string{name + ".live", name + ".replay", name + ".dead"}, []string{name + ".dead"})
	reg := prometheus.NewRegistry()
	proj := newWidgets()
	cfg := projection.Config{
		Name:           name,
		EntityTypes:    []string{"widget"},
		Projection:     proj,
		Pool:           openPool(t, e.dbURL, 3),
		AMQPURL:        e.amqpURL,
		Dial:           e.dial,
		Topology:       e.topo,
		RebuildTimeout: waitFor,
		Logger:         testLogger(t),
		Registerer:     reg,
	}
	for _, o := range opts {
		o(&cfg)
	}
	w, err := projection.NewWorker(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v after a stop", err)
				}
			case <-time.After(waitFor):
				t.Errorf("Run did not return within %s of a stop", waitFor)
			}
		})
	}
	t.Cleanup(stop)
	select {
	case <-w.Ready():
	case err := <-done:
		t.Fatalf("Run returned before it was ready: %v", err)
	case <-time.After(waitFor):
		t.Fatal("the worker did not become ready")
	}
	schema := cmpOr(cfg.Schema, name)
	return &testWorker{Worker: w, name: name, schema: schema, proj: proj, reg: reg, stop: stop}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func withPool(p *pgxpool.Pool) workerOpt { return func(c *projection.Config) { c.Pool = p } }
func withAMQP(u string) workerOpt        { return func(c *projection.Config) { c.AMQPURL = u } }
func withTimeout(d time.Duration) workerOpt {
	return func(c *projection.Config) { c.RebuildTimeout = d }
}
func withProjection(p *widgets) workerOpt { return func(c *projection.Config) { c.Projection = p } }
func withBatch(prefetch, size int) workerOpt {
	return func(c *projection.Config) { c.Prefetch, c.BatchSize = prefetch, size }
}
func withRebuildOnFirstStart() workerOpt {
	return func(c *projection.Config) { c.RebuildOnFirstStart = true }
}
func withSchema(s string) workerOpt { return func(c *projection.Config) { c.Schema = s } }
func withEntityTypes(ets ...string) workerOpt {
	return func(c *projection.Config) { c.EntityTypes = ets }
}
func withConfig(f func(*projection.Config)) workerOpt { return f }

func (w *testWorker) status(t testing.TB) projection.Status {
	t.Helper()
	st, err := w.Status(testCtx(t))
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	return st
}

// widget is a row of the read model.
type widget struct {
	Version int64
	State   string
}

// model reads the active generation, as a reader of the projection would.
func (e *env) model(t testing.TB, w *testWorker) map[string]widget {
	t.Helper()
	return e.query(t, `SELECT id, version, state FROM widgets WHERE generation = `+
		projection.ActiveGenerationSQL(w.schema, w.name))
}

// generation reads one generation directly.
func (e *env) generation(t testing.TB, gen int64) map[string]widget {
	t.Helper()
	return e.query(t, `SELECT id, version, state FROM widgets WHERE generation = $1`, gen)
}

func (e *env) query(t testing.TB, sql string, args ...any) map[string]widget {
	t.Helper()
	rows, err := e.db.Query(testCtx(t), sql, args...)
	if err != nil {
		t.Fatalf("query: %v", err)
	}
	defer rows.Close()
	out := map[string]widget{}
	for rows.Next() {
		var id string
		var w widget
		if err := rows.Scan(&id, &w.Version, &w.State); err != nil {
			t.Fatal(err)
		}
		out[id] = w
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// expect is the model that a set of histories converges to.
func expect(evs ...[]envelope.Event) map[string]widget {
	out := map[string]widget{}
	for _, h := range evs {
		for _, e := range h {
			if cur, ok := out[e.EntityID]; !ok || e.Version > cur.Version {
				out[e.EntityID] = widget{Version: e.Version, State: e.To}
			}
		}
	}
	return out
}

// sameModel explains how got differs from want, or returns "".
func sameModel(got, want map[string]widget) string {
	var diffs []string
	for id, w := range want {
		if g, ok := got[id]; !ok {
			diffs = append(diffs, id+" missing")
		} else if g != w {
			diffs = append(diffs, fmt.Sprintf("%s = %+v, want %+v", id, g, w))
		}
	}
	for id := range got {
		if _, ok := want[id]; !ok {
			diffs = append(diffs, id+" unexpected")
		}
	}
	slices.Sort(diffs)
	if len(diffs) > 5 {
		diffs = append(diffs[:5], fmt.Sprintf("... %d differences", len(diffs)))
	}
	return strings.Join(diffs, "; ")
}

// waitModel waits until the active model is want.
func (e *env) waitModel(t testing.TB, w *testWorker, want map[string]widget) {
	t.Helper()
	eventually(t, waitFor, "the active model converges", func() string { return sameModel(e.model(t, w), want) })
}

// queueDepth is the number of messages ready in queue.
func (e *env) queueDepth(t testing.TB, queue string) int {
	t.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("queue %s: %v", queue, err)
	}
	return q.Messages
}

// drain takes every message from queue (waiting until there are n).
func (e *env) drain(t testing.TB, queue string, n int) []amqp091.Delivery {
	t.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	// Consumed with automatic acks rather than basic.get, which the
	// in-process broker does not implement.
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	var got []amqp091.Delivery
	timeout := time.After(waitFor)
	for len(got) < n {
		select {
		case d, ok := <-deliveries:
			if !ok {
				t.Fatalf("consumer of %s closed after %d of %d messages", queue, len(got), n)
			}
			got = append(got, d)
		case <-timeout:
			t.Fatalf("messages in %s: not within %s: %d of %d", queue, waitFor, len(got), n)
		}
	}
	for { // and any more that are there
		select {
		case d, ok := <-deliveries:
			if ok {
				got = append(got, d)
				continue
			}
		case <-time.After(100 * time.Millisecond):
		}
		return got
	}
}

// hostPort returns the host:port of a URL.
func hostPort(t testing.TB, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

// withHost returns raw with its host:port replaced.
func withHost(t testing.TB, raw, hostport string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = hostport
	return u.String()
}

// counter reads a counter of the worker's registry.
func (w *testWorker) counter(t testing.TB, name string) float64 {
	t.Helper()
	mfs, err := w.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			total += m.GetCounter().GetValue()
		}
	}
	return total
}
