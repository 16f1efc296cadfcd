package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sandbox"
)

// deliveryWait bounds how long a test waits for one delivery.
const deliveryWait = 15 * time.Second

// eventually polls cond every 10ms until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, cond func() bool) bool {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline:
			return cond()
		case <-tick.C:
		}
	}
	return true
}

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// testRelay is what the shared scenarios drive: either relay.
type testRelay interface {
	outbox.Relay
	Running() <-chan struct{}
	Prune(ctx context.Context) (int64, error)
}

// relayOptions are the settings the scenarios choose, whichever relay runs.
type relayOptions struct {
	Retention     time.Duration
	PruneInterval time.Duration
	// Pipelined adjusts a PipelinedRelay's config (ignored by the forwarder).
	Pipelined func(*outbox.PipelinedConfig)
}

// target is where a relay reads and publishes.
type target struct {
	pool     *pgxpool.Pool
	amqpURL  string // what the relay dials: the broker, or a proxy in front of it
	exchange string
}

// relayKind is one Relay implementation, in the manner of Watermill's
// shared pub/sub test suite: every scenario runs against each kind.
type relayKind struct {
	name  string
	build func(t testing.TB, tg target, o relayOptions) testRelay
	// polled returns once r has looked at the outbox at least once after
	// the call began.
	polled func(t testing.TB, e *env, r testRelay)
}

var relayKinds = []relayKind{
	{
		name: "forwarder",
		build: func(t testing.TB, tg target, o relayOptions) testRelay {
			t.Helper()
			conn, err := broker.Connect(tg.amqpURL, watermill.NopLogger{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() })
			pub, err := broker.NewPublisher(conn, broker.PublisherConfig{Exchange: tg.exchange}, watermill.NopLogger{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = pub.Close() })
			r, err := outbox.NewForwarderRelay(outbox.Config{
				Pool: tg.pool, Publisher: pub, Topic: pgstore.OutboxTopic,
				Retention: o.Retention, PruneInterval: o.PruneInterval,
			})
			if err != nil {
				t.Fatalf("NewForwarderRelay: %v", err)
			}
			return r
		},
		// Each poll locks the offsets row (SELECT ... FOR UPDATE in its own
		// transaction), which changes the row's xmax.
		polled: func(t testing.TB, e *env, _ testRelay) {
			t.Helper()
			ctx := testCtx(t)
			xmax := func() string {
				var x string
				if err := e.store.Pool().QueryRow(ctx, `SELECT xmax::text FROM watermill_offsets_outbox WHERE consumer_group = 'relay'`).Scan(&x); err != nil {
					t.Fatalf("offsets row: %v", err)
				}
				return x
			}
			for range 2 { // the first change may be a poll already under way
				before := xmax()
				if !eventually(t, deliveryWait, func() bool { return xmax() != before }) {
					t.Fatal("the relay does not poll")
				}
			}
		},
	},
	{
		name: "pipelined",
		build: func(t testing.TB, tg target, o relayOptions) testRelay {
			t.Helper()
			c := outbox.PipelinedConfig{
				Pool: tg.pool, AMQPURL: tg.amqpURL, Exchange: tg.exchange, Topic: pgstore.OutboxTopic,
				Retention: o.Retention, PruneInterval: o.PruneInterval,
			}
			if o.Pipelined != nil {
				o.Pipelined(&c)
			}
			r, err := outbox.NewPipelinedRelay(c)
			if err != nil {
				t.Fatalf("NewPipelinedRelay: %v", err)
			}
			return r
		},
		// An idle PipelinedRelay looks without locking anything; it counts
		// its looks instead.
		polled: func(t testing.TB, _ *env, r testRelay) {
			t.Helper()
			p := r.(*outbox.PipelinedRelay)
			before := p.Stats().Polls
			if !eventually(t, deliveryWait, func() bool { return p.Stats().Polls >= before+2 }) {
				t.Fatal("the relay does not poll")
			}
		},
	},
}

func kind(name string) relayKind {
	for _, k := range relayKinds {
		if k.name == name {
			return k
		}
	}
	panic("no relay kind " + name)
}

// forEachRelay runs scenario once per relay kind, in parallel subtests.
func forEachRelay(t *testing.T, scenario func(t *testing.T, k relayKind)) {
	for _, k := range relayKinds {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			scenario(t, k)
		})
	}
}

// received is a delivery and when it arrived.
type received struct {
	d  amqp091.Delivery
	at time.Time
}

// env is one test's database (framework schema and a "widgets" table) and
// broker namespace, with a consumer queue bound to widget.#.
type env struct {
	dbURL      string
	store      *pgstore.Store
	relayPool  *pgxpool.Pool
	amqpURL    string
	topo       broker.Topology
	deliveries chan received
}

// harness is an env with one running relay.
type harness struct {
	*env
	kind  relayKind
	relay testRelay
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

func newEnv(t testing.TB, durableQueue bool) *env {
	t.Helper()
	ctx := testCtx(t)
	dbURL := sandbox.Postgres(t)
	storePool := openPool(t, dbURL, 4)
	if err := pgstore.Migrate(ctx, storePool, pgstore.Framework()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if _, err := storePool.Exec(ctx, `CREATE TABLE widgets (id uuid PRIMARY KEY, state text NOT NULL, version bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}

	amqpURL, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	queue := ns + ".consumer"
	sandbox.DeleteLater(t, []string{queue, topo.UnroutableQueue()},
		[]string{topo.EventsExchange, topo.CommandsExchange, topo.UnroutableExchange()})
	conn, err := amqp091.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := broker.DeclareShared(broker.WrapAMQPChannel(ch), topo); err != nil {
		t.Fatalf("DeclareShared: %v", err)
	}
	if _, err := ch.QueueDeclare(queue, durableQueue, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(queue, envelope.LiveBinding("widget"), topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	msgs, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{
		dbURL:      dbURL,
		store:      pgstore.New(storePool, nil),
		relayPool:  openPool(t, dbURL, 3),
		amqpURL:    amqpURL,
		topo:       topo,
		deliveries: make(chan received, 1<<15),
	}
	go func() {
		for d := range msgs {
			e.deliveries <- received{d: d, at: time.Now()}
		}
	}()
	return e
}

func (e *env) target() target {
	return target{pool: e.relayPool, amqpURL: e.amqpURL, exchange: e.topo.EventsExchange}
}

// setup gives t a fresh env and a running relay of kind k.
func setup(t *testing.T, k relayKind, o relayOptions) *harness {
	t.Helper()
	e := newEnv(t, false)
	r := k.build(t, e.target(), o)
	runRelay(t, r)
	return &harness{env: e, kind: k, relay: r}
}

// startRelay runs r until t ends or the returned stop is called. stop
// fails t if Run returns an error or does not return in time.
func startRelay(t testing.TB, r testRelay) (stop func(), runErr <-chan error) {
	t.Helper()
	runCtx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- r.Run(runCtx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					t.Errorf("relay Run: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Error("relay Run did not return after cancel")
			}
			_ = r.Close()
		})
	}
	t.Cleanup(stop)
	return stop, errc
}

// runRelay starts r and waits for it to be running.
func runRelay(t testing.TB, r testRelay) (stop func()) {
	t.Helper()
	stop, runErr := startRelay(t, r)
	select {
	case <-r.Running():
	case err := <-runErr:
		t.Fatalf("relay stopped at start: %v", err)
	case <-time.After(deliveryWait):
		t.Fatal("relay did not start")
	}
	return stop
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
		Attributes:    json.RawMessage(fmt.Sprintf(`{"id":%q,"state":%q,"size":%d}`, entityID, to, version)),
		OccurredAt:    time.Now().UTC().Truncate(time.Microsecond),
		CorrelationID: "corr-" + uuid.NewString()[:8],
	}
}

func (e *env) newWidget(t testing.TB) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := e.store.Pool().Exec(testCtx(t), `INSERT INTO widgets (id, state, version) VALUES ($1, 'initialized', 0)`, id); err != nil {
		t.Fatal(err)
	}
	return id
}

// fire runs one command on widget id the way a handler does: lock the
// entity first (LockEntity, then the row), read its version, and append n
// transitions after it.
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
		next := "even"
		if (version+1)%2 == 1 {
			next = "odd"
		}
		event := "step"
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

// fill commits n events as fast as it can: writers goroutines, each on its
// own widget, perTx transitions per transaction. It returns the event ids.
func (e *env) fill(t testing.TB, n, writers, perTx int) map[string]bool {
	t.Helper()
	ctx := testCtx(t)
	var mu sync.Mutex
	ids := make(map[string]bool, n)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		id := e.newWidget(t)
		share := n / writers
		if w < n%writers {
			share++
		}
		wg.Go(func() {
			for share > 0 {
				k := min(perTx, share)
				var events []*envelope.Event
				err := e.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
					var err error
					events, err = fire(ctx, tx, id, k)
					return err
				})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				for _, ev := range events {
					ids[ev.ID] = true
				}
				mu.Unlock()
				share -= k
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("fill: %v", err)
	}
	return ids
}

// holdOpen appends one transition to widget id in a transaction that stays
// open until the returned commit function is called.
func (e *env) holdOpen(t *testing.T, id string) (*envelope.Event, func()) {
	t.Helper()
	appended := make(chan *envelope.Event, 1)
	release := make(chan struct{})
	done := make(chan error, 1)
	ctx := testCtx(t)
	go func() {
		done <- e.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
			events, err := fire(ctx, tx, id, 1)
			if err != nil {
				return err
			}
			appended <- events[0]
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	var ev *envelope.Event
	select {
	case ev = <-appended:
	case err := <-done:
		t.Fatalf("held transaction failed: %v", err)
	case <-time.After(deliveryWait):
		t.Fatal("held transaction did not append")
	}
	var once sync.Once
	commit := func() {
		once.Do(func() {
			close(release)
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("held transaction commit: %v", err)
				}
			case <-time.After(deliveryWait):
				t.Fatal("held transaction did not commit")
			}
		})
	}
	t.Cleanup(func() {
		once.Do(func() { close(release) })
	})
	return ev, commit
}

// relayPolled waits until the relay has looked at the outbox after this call.
func (h *harness) relayPolled(t *testing.T) {
	t.Helper()
	h.kind.polled(t, h.env, h.relay)
}

// collect waits for n deliveries.
func (e *env) collect(t testing.TB, n int) []received {
	t.Helper()
	var got []received
	for len(got) < n {
		select {
		case r := <-e.deliveries:
			got = append(got, r)
		case <-time.After(deliveryWait):
			t.Fatalf("received %d of %d events", len(got), n)
		}
	}
	return got
}

// collectAll waits until every id in want was delivered at least once and
// returns how often each arrived (duplicates allowed), failing with the
// missing count after timeout.
func (e *env) collectAll(t testing.TB, want map[string]bool, timeout time.Duration) map[string]int {
	t.Helper()
	seen := make(map[string]int, len(want))
	deadline := time.After(timeout)
	for missing := len(want); missing > 0; {
		select {
		case r := <-e.deliveries:
			id := r.d.MessageId
			if !want[id] {
				t.Fatalf("delivered message %q is not an appended event", id)
			}
			if seen[id] == 0 {
				missing--
			}
			seen[id]++
		case <-deadline:
			t.Fatalf("after %v, %d of %d events never arrived", timeout, missing, len(want))
		}
	}
	return seen
}

// noMore asserts nothing else arrives for a short while (no duplicates).
func (e *env) noMore(t testing.TB) {
	t.Helper()
	select {
	case r := <-e.deliveries:
		t.Fatalf("unexpected extra delivery %s %s", r.d.RoutingKey, r.d.MessageId)
	case <-time.After(300 * time.Millisecond):
	}
}

func flush(t testing.TB, r outbox.Relay) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deliveryWait)
	defer cancel()
	if err := r.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	n, err := r.Pending(ctx)
	if err != nil || n != 0 {
		t.Fatalf("Pending after Flush = %d, %v; want 0", n, err)
	}
}

func (h *harness) flush(t *testing.T) { t.Helper(); flush(t, h.relay) }

// checkDelivery asserts d is e on the wire as DESIGN §5 fixes it.
func checkDelivery(t testing.TB, d amqp091.Delivery, e *envelope.Event, exchange string) {
	t.Helper()
	if d.DeliveryMode != 2 {
		t.Errorf("%s: delivery_mode = %d, want 2", e.ID, d.DeliveryMode)
	}
	if d.ContentType != "application/json" {
		t.Errorf("%s: content_type = %q", e.ID, d.ContentType)
	}
	if d.MessageId != e.ID {
		t.Errorf("message_id = %q, want %q", d.MessageId, e.ID)
	}
	if d.CorrelationId != e.CorrelationID {
		t.Errorf("%s: correlation_id property = %q, want %q", e.ID, d.CorrelationId, e.CorrelationID)
	}
	if d.Exchange != exchange || d.RoutingKey != "widget."+e.Event {
		t.Errorf("%s: exchange %q routing key %q, want %q %q", e.ID, d.Exchange, d.RoutingKey, exchange, "widget."+e.Event)
	}
	if got, _ := d.Headers[envelope.HeaderCorrelationID].(string); got != e.CorrelationID {
		t.Errorf("%s: correlation_id header = %#v, want %q", e.ID, d.Headers[envelope.HeaderCorrelationID], e.CorrelationID)
	}
	if got, _ := d.Headers[envelope.HeaderSchemaVersion].(string); got != "1" {
		t.Errorf("%s: schema_version header = %#v, want \"1\"", e.ID, d.Headers[envelope.HeaderSchemaVersion])
	}
	if got, _ := d.Headers["_watermill_message_uuid"].(string); got != e.ID {
		t.Errorf("%s: _watermill_message_uuid header = %#v, want the event id", e.ID, d.Headers["_watermill_message_uuid"])
	}
	got, err := envelope.Decode(d.Body)
	if err != nil {
		t.Fatalf("%s: body does not decode: %v: %s", e.ID, err, d.Body)
	}
	if got.Sequence <= 0 {
		t.Errorf("%s: sequence not set in the published event", e.ID)
	}
	var ga, wa any
	if err := json.Unmarshal(got.Attributes, &ga); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(e.Attributes, &wa); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ga, wa) {
		t.Errorf("%s: attributes %s, want %s", e.ID, got.Attributes, e.Attributes)
	}
	if !got.OccurredAt.Equal(e.OccurredAt) {
		t.Errorf("%s: occurred_at %v, want %v", e.ID, got.OccurredAt, e.OccurredAt)
	}
	want := *e
	got.Attributes, want.Attributes = nil, nil
	got.OccurredAt, want.OccurredAt = time.Time{}, time.Time{}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("published event:\n got %+v\nwant %+v", got, want)
	}
}

func TestRelayDeliversEveryEventWithWireProperties(t *testing.T) {
	t.Parallel()
	forEachRelay(t, func(t *testing.T, k relayKind) {
		h := setup(t, k, relayOptions{})
		a, b := h.newWidget(t), h.newWidget(t)

		// Many concurrent commands on two widgets: each serialises on its
		// row lock, so its versions must reach the consumer in order.
		const workers, perWorker = 4, 5
		var mu sync.Mutex
		byID := map[string]*envelope.Event{}
		ctx := testCtx(t)
		var wg sync.WaitGroup
		errs := make(chan error, 2*workers*perWorker)
		for w := range 2 * workers {
			id := a
			if w%2 == 1 {
				id = b
			}
			wg.Go(func() {
				for i := range perWorker {
					n := 1 + (w+i)%2 // some commands make two transitions in one transaction
					var events []*envelope.Event
					err := h.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
						var err error
						events, err = fire(ctx, tx, id, n)
						return err
					})
					if err != nil {
						errs <- err
						return
					}
					mu.Lock()
					for _, e := range events {
						byID[e.ID] = e
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("command: %v", err)
		}

		got := h.collect(t, len(byID))
		h.flush(t)
		h.noMore(t)

		seen := map[string]bool{}
		lastVersion := map[string]int64{}
		for _, r := range got {
			e, ok := byID[r.d.MessageId]
			if !ok {
				t.Fatalf("delivered message %q is not an appended event", r.d.MessageId)
			}
			if seen[e.ID] {
				t.Fatalf("event %s delivered twice", e.ID)
			}
			seen[e.ID] = true
			checkDelivery(t, r.d, e, h.topo.EventsExchange)
			if e.Version != lastVersion[e.EntityID]+1 {
				h.dumpOrder(t, got)
				t.Fatalf("widget %s: version %d arrived after %d: per-entity order broken", e.EntityID, e.Version, lastVersion[e.EntityID])
			}
			lastVersion[e.EntityID] = e.Version
		}
		if len(seen) != len(byID) {
			t.Fatalf("delivered %d distinct events, want %d", len(seen), len(byID))
		}
	})
}

// Not parallel with the other tests: their held transactions hold back
// pg_snapshot_xmin for the whole cluster, and with it every relay.
func TestRelayIdleLatency(t *testing.T) {
	forEachRelay(t, func(t *testing.T, k relayKind) {
		h := setup(t, k, relayOptions{})
		id := h.newWidget(t)
		const n = 10
		var total, worst time.Duration
		for i := range n {
			events := h.commit(t, id, 1)
			committed := time.Now()
			r := h.collect(t, 1)[0]
			if r.d.MessageId != events[0].ID {
				t.Fatalf("event %d: got %s, want %s", i, r.d.MessageId, events[0].ID)
			}
			lat := max(r.at.Sub(committed), 0) // negative: delivered before InTx returned to us
			total += lat
			worst = max(worst, lat)
			if lat > 2*time.Second {
				t.Errorf("event %d took %v from commit to delivery while idle", i, lat)
			}
		}
		t.Logf("%s: idle commit→delivery latency over %d events: mean %v, max %v (default config)", k.name, n, total/n, worst)
	})
}

func TestPruneDeletesOnlyPublishedRows(t *testing.T) {
	t.Parallel()
	forEachRelay(t, func(t *testing.T, k relayKind) {
		h := setup(t, k, relayOptions{Retention: time.Nanosecond, PruneInterval: time.Hour})
		ctx := testCtx(t)
		a, b, c, d := h.newWidget(t), h.newWidget(t), h.newWidget(t), h.newWidget(t)
		rowCount := func(eventID string) int {
			t.Helper()
			var n int
			if err := h.store.Pool().QueryRow(ctx, `SELECT count(*) FROM watermill_outbox WHERE payload->>'uuid' = $1`, eventID).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		}

		pruned := h.commit(t, a, 2)
		kept := h.commit(t, d, 1)[0]
		h.collect(t, 3)
		h.flush(t)

		// A relay with the default retention (1h) deletes nothing yet. It
		// never runs, so it holds nothing that needs closing.
		keep := k.build(t, h.target(), relayOptions{})
		if n, err := keep.Prune(ctx); err != nil || n != 0 {
			t.Fatalf("Prune with a 1h retention deleted %d rows (%v)", n, err)
		}

		// An open transaction has written its outbox row; a later one
		// commits. Neither is published: the relay waits for the older one.
		held, commitHeld := h.holdOpen(t, b)
		later := h.commit(t, c, 1)[0]
		if n, err := h.relay.Pending(ctx); err != nil || n < 1 {
			t.Fatalf("Pending = %d, %v; want the committed, unpublished row counted", n, err)
		}
		h.relayPolled(t)

		n, err := h.relay.Prune(ctx)
		if err != nil {
			t.Fatalf("Prune: %v", err)
		}
		if n != int64(len(pruned)) {
			t.Errorf("Prune deleted %d rows, want the %d rows of the older published transaction", n, len(pruned))
		}
		for _, e := range pruned {
			if rowCount(e.ID) != 0 {
				t.Errorf("published row %s survived Prune", e.ID)
			}
		}
		// The last published transaction's rows stay (Prune compares xids only).
		if rowCount(kept.ID) != 1 {
			t.Errorf("the newest published transaction's row was pruned")
		}
		if rowCount(later.ID) != 1 {
			t.Fatal("Prune deleted a committed row the relay has not published")
		}

		commitHeld()
		if rowCount(held.ID) != 1 {
			t.Fatal("the held transaction's row is gone after it committed")
		}
		got := h.collect(t, 2)
		ids := map[string]bool{got[0].d.MessageId: true, got[1].d.MessageId: true}
		if !ids[held.ID] || !ids[later.ID] {
			t.Fatalf("after commit got %v, want the held event %s and the later one %s", ids, held.ID, later.ID)
		}
		h.flush(t)
		h.noMore(t)

		// Once published, the held row goes too.
		if _, err := h.relay.Prune(ctx); err != nil {
			t.Fatal(err)
		}
		if rowCount(held.ID) != 0 || rowCount(kept.ID) != 0 {
			t.Error("a published row older than the last published transaction survived Prune")
		}
		if rowCount(later.ID) != 1 {
			t.Error("the newest published transaction's row was pruned")
		}
	})
}

func TestRelayDoesNotSkipAHeldTransaction(t *testing.T) {
	t.Parallel()
	forEachRelay(t, func(t *testing.T, k relayKind) {
		h := setup(t, k, relayOptions{})
		a, b := h.newWidget(t), h.newWidget(t)

		held, commitHeld := h.holdOpen(t, a)
		want := map[string]*envelope.Event{held.ID: held}
		for range 5 {
			for _, e := range h.commit(t, b, 1) {
				want[e.ID] = e
			}
		}
		// Let the relay look after the later commits: it must not move past
		// the held transaction.
		h.relayPolled(t)
		if n := len(h.deliveries); n != 0 {
			t.Fatalf("%d events delivered while an older transaction was open: the relay moved past it", n)
		}

		commitHeld()
		got := h.collect(t, len(want))
		h.flush(t)
		h.noMore(t)
		seen := map[string]int{}
		for _, r := range got {
			e, ok := want[r.d.MessageId]
			if !ok {
				t.Fatalf("unexpected event %s", r.d.MessageId)
			}
			seen[e.ID]++
			checkDelivery(t, r.d, e, h.topo.EventsExchange)
		}
		for id := range want {
			if seen[id] != 1 {
				t.Errorf("event %s delivered %d times, want once", id, seen[id])
			}
		}
		if seen[held.ID] != 1 {
			t.Fatal("the relay skipped the transaction that was open while later ones committed")
		}
	})
}

// A row that is not a forwarder envelope is logged and passed over; the
// rows around it are delivered.
func TestRelaySkipsRowsThatAreNotEnvelopes(t *testing.T) {
	t.Parallel()
	forEachRelay(t, func(t *testing.T, k relayKind) {
		h := setup(t, k, relayOptions{})
		ctx := testCtx(t)
		id := h.newWidget(t)
		before := h.commit(t, id, 1)[0]
		for _, junk := range []string{`{"uuid":"x","payload":"e30="}`, `[1,2]`} {
			if _, err := h.store.Pool().Exec(ctx, `
				INSERT INTO watermill_outbox (uuid, payload, metadata, transaction_id)
				VALUES ($1, $2, '{}', pg_current_xact_id())`, uuid.NewString(), junk); err != nil {
				t.Fatal(err)
			}
		}
		after := h.commit(t, id, 1)[0]
		got := h.collect(t, 2)
		if got[0].d.MessageId != before.ID || got[1].d.MessageId != after.ID {
			t.Fatalf("got %s, %s; want %s then %s", got[0].d.MessageId, got[1].d.MessageId, before.ID, after.ID)
		}
		h.flush(t)
		h.noMore(t)
		if p, ok := h.relay.(*outbox.PipelinedRelay); ok {
			if s := p.Stats(); s.Skipped != 2 {
				t.Errorf("Stats().Skipped = %d, want 2", s.Skipped)
			}
		}
	})
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	if _, err := outbox.NewForwarderRelay(outbox.Config{}); err == nil {
		t.Fatal("NewForwarderRelay accepted a config without pool, publisher and topic")
	}
	if _, err := outbox.NewPipelinedRelay(outbox.PipelinedConfig{}); err == nil {
		t.Fatal("NewPipelinedRelay accepted a config without pool, broker, exchange and topic")
	}
	var joined interface{ Unwrap() []error }
	err := outbox.Config{PollInterval: -1}.Validate()
	if !errors.As(err, &joined) || len(joined.Unwrap()) < 4 {
		t.Fatalf("Validate should report every problem at once, got %v", err)
	}
	err = outbox.PipelinedConfig{BatchDeadline: -1}.Validate()
	if !errors.As(err, &joined) || len(joined.Unwrap()) != 5 {
		t.Fatalf("PipelinedConfig.Validate should report every problem at once, got %v", err)
	}
}

// dumpOrder logs the arrival order next to the history's xids, to explain an
// order failure.
func (e *env) dumpOrder(t *testing.T, got []received) {
	t.Helper()
	for i, r := range got {
		ev, _ := envelope.Decode(r.d.Body)
		var xid string
		_ = e.store.Pool().QueryRow(testCtx(t), `SELECT transaction_id::text FROM history WHERE event_id = $1`, ev.ID).Scan(&xid)
		t.Logf("#%02d %s v%-3d seq %-4d xid %s", i, ev.EntityID[:8], ev.Version, ev.Sequence, xid)
	}
}

// A relay that starts while PostgreSQL is unreachable keeps trying, and
// relays once the database is back: it never stops the service.
func TestRelaySurvivesDatabaseDownAtStart(t *testing.T) {
	t.Parallel()
	forEachRelay(t, func(t *testing.T, k relayKind) {
		ctx := testCtx(t)
		e := newEnv(t, false)
		ev := e.commit(t, e.newWidget(t), 1)[0]

		u, err := url.Parse(e.dbURL)
		if err != nil {
			t.Fatal(err)
		}
		proxy := sandbox.NewProxy(t, u.Host)
		proxy.Down()
		u.Host = proxy.Addr()
		tg := e.target()
		tg.pool = openPool(t, u.String(), 2)
		relay := k.build(t, tg, relayOptions{})
		_, runErr := startRelay(t, relay)

		// Let it fail at least twice: the first attempt and a retry.
		if !eventually(t, 20*time.Second, func() bool { return proxy.Accepted() >= 2 }) {
			t.Fatal("the relay never tried to reach the database")
		}
		select {
		case err := <-runErr:
			t.Fatalf("the relay stopped instead of waiting for the database: %v", err)
		case <-relay.Running():
			t.Fatal("Running closed although the database is unreachable")
		default:
		}
		proxy.Up()
		got := e.collect(t, 1)[0]
		checkDelivery(t, got.d, ev, e.topo.EventsExchange)
		if !eventually(t, deliveryWait, func() bool {
			n, err := relay.Pending(ctx)
			return err == nil && n == 0
		}) {
			t.Fatal("the relay published but did not record it")
		}
		select {
		case <-relay.Running():
		default:
			t.Fatal("Running not closed although the relay published")
		}
	})
}
