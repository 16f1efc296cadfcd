package replay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/membroker"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

// waitLong bounds every wait for a replay or a delivery.
const waitLong = 3 * time.Minute // generous: deadlines only bound a failure, and CI machines are shared

// quietWindow is how long a test watches for messages that must not come.
const quietWindow = 750 * time.Millisecond

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds, failing t after timeout.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
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

// never fails t if cond holds at any time within window.
func never(t testing.TB, window time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(window)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			t.Fatalf("%s", what)
		}
		select {
		case <-deadline:
			return
		case <-tick.C:
		}
	}
}

// env is one test's database (framework schema plus a widgets table) and
// broker namespace (shared topology, a request queue name).
type env struct {
	pool    *pgxpool.Pool
	store   *pgstore.Store
	dbURL   string
	amqpURL string        // RabbitMQ; "" on the in-process broker
	dial    broker.Dialer // the in-process broker's; nil on RabbitMQ (responders dial AMQPURL)
	topo    broker.Topology
	queue   string
	conn    broker.Conn
}

// newEnv is an environment on RabbitMQ.
func newEnv(t testing.TB) *env { return newEnvOn(t, false) }

// onEachBroker runs test in parallel on RabbitMQ and on the in-process
// broker of the embedded mode (membroker), each with an environment of its
// own.
func onEachBroker(t *testing.T, test func(t *testing.T, e *env)) {
	t.Parallel()
	for _, b := range []struct {
		name      string
		inProcess bool
	}{{"rabbitmq", false}, {"inprocess", true}} {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			test(t, newEnvOn(t, b.inProcess))
		})
	}
}

func newEnvOn(t testing.TB, inProcess bool) *env {
	t.Helper()
	ctx := testCtx(t)
	e := &env{dbURL: sandbox.Postgres(t)}
	e.pool = openPool(t, e.dbURL, 5)
	if err := pgstore.Migrate(ctx, e.pool, pgstore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if _, err := e.pool.Exec(ctx, `CREATE TABLE widgets (id uuid PRIMARY KEY, state text NOT NULL, version bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	e.store = pgstore.New(e.pool, nil)

	var ns string
	var dial broker.Dialer
	if inProcess {
		mb, err := membroker.New(membroker.Config{Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = mb.Close() })
		e.dial, ns = mb.Dialer(), sandbox.Name("t")
		dial = e.dial
	} else {
		e.amqpURL, ns = sandbox.Broker(t)
		dial = broker.AMQPDialer(e.amqpURL)
	}
	e.topo = broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	e.queue = ns + ".replay_requests"
	if !inProcess {
		sandbox.DeleteLater(t, []string{e.queue, e.queue + ".dead", e.topo.UnroutableQueue()},
			[]string{e.topo.EventsExchange, e.topo.CommandsExchange, e.topo.UnroutableExchange()})
	}
	conn, err := dial("replay test " + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	e.conn = conn
	ch := e.channel(t)
	if err := broker.DeclareShared(ch, e.topo); err != nil {
		t.Fatalf("DeclareShared: %v", err)
	}
	return e
}

func openPool(t testing.TB, url string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	pool, err := pgstore.Open(testCtx(t), pgstore.PoolConfig{URL: url, MaxConns: maxConns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func (e *env) channel(t testing.TB) broker.Channel {
	t.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Close() })
	return ch
}

func testLogger() *slog.Logger {
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

func (e *env) config(mutate ...func(*replay.Config)) replay.Config {
	c := replay.Config{
		Pool: e.pool, AMQPURL: e.amqpURL, Dial: e.dial, Topology: e.topo,
		EntityTypes: []string{"widget", "gadget"}, QueueName: e.queue,
		Workers: 3, Logger: testLogger(),
	}
	for _, m := range mutate {
		m(&c)
	}
	return c
}

// running is a Responder whose Run goroutine the test controls.
type running struct {
	*replay.Responder
	stop func() error
}

// start runs a Responder until the test ends (or stop is called) and waits
// until it consumes its request queue.
func (e *env) start(t testing.TB, mutate ...func(*replay.Config)) *running {
	t.Helper()
	r, err := replay.NewResponder(e.config(mutate...))
	if err != nil {
		t.Fatalf("NewResponder: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	var stopErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case stopErr = <-done:
			case <-time.After(30 * time.Second):
				stopErr = fmt.Errorf("Run did not return within 30s of cancellation")
			}
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-r.Ready():
	case err := <-done:
		t.Fatalf("Run returned at start: %v", err)
	case <-time.After(waitLong):
		t.Fatal("the responder did not start consuming")
	}
	return &running{Responder: r, stop: stop}
}

// --- writing history the way a command handler does ---

func (e *env) newWidget(t testing.TB) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := e.pool.Exec(testCtx(t), `INSERT INTO widgets (id, state, version) VALUES ($1, 'initialized', 0)`, id); err != nil {
		t.Fatal(err)
	}
	return id
}

func widgetEvent(entityID string, version int64, event, from, to string) *envelope.Event {
	return &envelope.Event{
		ID:            uuid.Must(uuid.NewV7()).String(),
		SchemaVersion: envelope.SchemaVersion,
		EntityType:    "widget",
		EntityID:      entityID,
		Version:       version,
		Event:         event,
		From:          from,
		To:            to,
		Attributes:    json.RawMessage(fmt.Sprintf(`{"state":%q,"id":%q,"size":%d}`, to, entityID, version)),
		OccurredAt:    time.Now(),
		CorrelationID: "corr-" + uuid.NewString()[:8],
	}
}

// fire runs one command on widget id as a handler does: lock the entity,
// then its row, then append n transitions after its version.
func fire(ctx context.Context, tx *pgstore.Tx, id string, n int) ([]*envelope.Event, error) {
	if err := tx.LockEntity(ctx, "widget", id); err != nil {
		return nil, err
	}
	var state string
	var version int64
	if err := tx.QueryRow(ctx, `SELECT state, version FROM widgets WHERE id = $1 FOR UPDATE`, id).Scan(&state, &version); err != nil {
		return nil, err
	}
	var events []*envelope.Event
	for range n {
		next, event := "even", "step"
		if (version+1)%2 == 1 {
			next = "odd"
		}
		if version == 0 {
			event = "create"
		}
		version++
		events = append(events, widgetEvent(id, version, event, state, next))
		state = next
	}
	if _, err := tx.Exec(ctx, `UPDATE widgets SET state = $2, version = $3 WHERE id = $1`, id, state, version); err != nil {
		return nil, err
	}
	return events, tx.Append(ctx, events...)
}

// commit runs one command of n transitions on widget id.
func (e *env) commit(t testing.TB, id string, n int) []*envelope.Event {
	t.Helper()
	var events []*envelope.Event
	err := e.store.InTx(testCtx(t), func(ctx context.Context, tx *pgstore.Tx) error {
		var err error
		events, err = fire(ctx, tx, id, n)
		return err
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}
	return events
}

// bulk inserts n widget transitions (5 versions per entity) in one
// statement: for volume tests, where going through Append would make the
// setup slower than the replay under test.
func (e *env) bulk(t testing.TB, n int) {
	t.Helper()
	seed := uuid.NewString()
	_, err := e.pool.Exec(testCtx(t), `
		INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
		                     attributes, correlation_id, occurred_at)
		SELECT gen_random_uuid(), 'widget', md5($2 || (g / 5)::text)::uuid, g % 5 + 1,
		       CASE WHEN g % 5 = 0 THEN 'create' ELSE 'step' END, 'odd', 'even',
		       jsonb_build_object('id', md5($2 || (g / 5)::text)::uuid, 'state', 'even', 'size', g,
		                          'label', repeat('x', 64)),
		       'corr-bulk', now()
		FROM generate_series(0, $1 - 1) g`, n, seed)
	if err != nil {
		t.Fatalf("bulk insert: %v", err)
	}
}

func (e *env) historyIDs(t testing.TB, where string, args ...any) []string {
	t.Helper()
	rows, err := e.pool.Query(testCtx(t), `SELECT event_id::text FROM history WHERE entity_type = 'widget' `+where+` ORDER BY sequence`, args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

// --- observing the events exchange ---

// observer is an exclusive queue bound to the events exchange.
type observer struct {
	mu         sync.Mutex
	deliveries []amqp091.Delivery
	count      int
	keep       bool
}

// observe binds a fresh queue with bindings and collects what arrives.
func (e *env) observe(t testing.TB, bindings ...string) *observer {
	t.Helper()
	return e.observeWith(t, true, bindings...)
}

// observeWith can count without keeping the messages (volume tests).
func (e *env) observeWith(t testing.TB, keep bool, bindings ...string) *observer {
	t.Helper()
	ch := e.channel(t)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bindings {
		if err := ch.QueueBind(q.Name, b, e.topo.EventsExchange, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Acked, with a prefetch: with auto-ack the broker pushes without limit,
	// and an observer slower than the replay (-race on a busy machine)
	// would hold the backlog in this process's heap, which
	// TestReplayThroughputAndBoundedMemory measures.
	if err := ch.Qos(256, 0, false); err != nil {
		t.Fatal(err)
	}
	msgs, err := ch.Consume(q.Name, "", false, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	o := &observer{keep: keep}
	go func() {
		for d := range msgs {
			_ = d.Ack(false)
			o.mu.Lock()
			o.count++
			if o.keep {
				o.deliveries = append(o.deliveries, d)
			}
			o.mu.Unlock()
		}
	}()
	return o
}

func (o *observer) all() []amqp091.Delivery {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.deliveries)
}

func (o *observer) n() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.count
}

// run is what one replay delivered to an observer.
type run struct {
	started   replay.Started
	completed replay.Completed
	starts    int                // replay_started markers seen
	events    []amqp091.Delivery // one-event messages
	batches   []amqp091.Delivery // replay_batch messages
	batched   []envelope.Event   // their events, in arrival order
	ids       []string           // event ids, in arrival order
}

// collect returns replay id's messages once its completion marker and
// Count distinct events have arrived.
func (o *observer) collect(t testing.TB, id string) run {
	t.Helper()
	var r run
	eventually(t, waitLong, "replay "+id+" to complete", func() bool {
		r = o.replayOf(t, id)
		return r.completed.ReplayID != "" && len(distinct(r.ids)) == int(r.completed.Count)
	})
	return r
}

func (o *observer) replayOf(t testing.TB, id string) run {
	t.Helper()
	var r run
	for _, d := range o.all() {
		if d.Headers[envelope.HeaderReplayID] != id {
			continue
		}
		_, _, event := cutLast(d.RoutingKey)
		switch event {
		case replay.StartedEvent:
			r.starts++
			if err := json.Unmarshal(d.Body, &r.started); err != nil {
				t.Fatalf("replay_started body %s: %v", d.Body, err)
			}
		case replay.CompletedEvent:
			if err := json.Unmarshal(d.Body, &r.completed); err != nil {
				t.Fatalf("replay_completed body %s: %v", d.Body, err)
			}
		case replay.BatchEvent:
			es, err := envelope.DecodeBatch(d.Body)
			if err != nil {
				t.Fatalf("replay_batch body %s: %v", d.Body, err)
			}
			r.batches = append(r.batches, d)
			r.batched = append(r.batched, es...)
			for _, e := range es {
				r.ids = append(r.ids, e.ID)
			}
		default:
			r.events = append(r.events, d)
			r.ids = append(r.ids, d.MessageId)
		}
	}
	return r
}

// cutLast splits a routing key at its last dot.
func cutLast(key string) (before, sep, after string) {
	i := strings.LastIndex(key, ".")
	if i < 0 {
		return "", "", key
	}
	return key[:i], ".", key[i+1:]
}

func distinct(ids []string) map[string]bool {
	m := make(map[string]bool, len(ids))
	for _, id := range ids {
		m[id] = true
	}
	return m
}

// submit records a replay and returns its id.
func submit(t testing.TB, r *running, req replay.Request) string {
	t.Helper()
	got, err := r.Submit(testCtx(t), req)
	if err != nil {
		t.Fatalf("Submit(%+v): %v", req, err)
	}
	return got.ReplayID
}

// waitStatus waits until the recorded replay reaches status.
func waitStatus(t testing.TB, r *running, id string, status replay.Status) replay.Record {
	t.Helper()
	var rec replay.Record
	eventually(t, waitLong, "replay "+id+" to be "+string(status), func() bool {
		var err error
		rec, err = r.Get(testCtx(t), id)
		if err != nil {
			t.Fatalf("Get: %v", err)
		}
		if rec.Status == replay.StatusFailed && status != replay.StatusFailed {
			t.Fatalf("replay %s failed: %s", id, rec.Error)
		}
		return rec.Status == status
	})
	return rec
}
