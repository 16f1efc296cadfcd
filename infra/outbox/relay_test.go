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
	"github.com/ThreeDotsLabs/watermill/message"
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

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, cond func() bool) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// received is a delivery and when it arrived.
type received struct {
	d  amqp091.Delivery
	at time.Time
}

type harness struct {
	store      *pgstore.Store
	relay      *outbox.ForwarderRelay
	relayPool  *pgxpool.Pool
	topo       broker.Topology
	deliveries chan received
}

func openPool(t *testing.T, url string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	pool, err := pgstore.Open(testCtx(t), pgstore.PoolConfig{URL: url, MaxConns: maxConns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// setup gives t a fresh database (framework schema and a "widgets" table), a
// namespaced topology with a consumer queue bound to widget.#, and a running
// relay configured by c (Pool, Publisher and Topic are filled in).
func setup(t *testing.T, c outbox.Config) *harness {
	t.Helper()
	ctx := testCtx(t)
	dbURL := sandbox.Postgres(t)
	storePool := openPool(t, dbURL, 3)
	relayPool := openPool(t, dbURL, 3)
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
	if err := broker.DeclareShared(ch, topo); err != nil {
		t.Fatalf("DeclareShared: %v", err)
	}
	if _, err := ch.QueueDeclare(queue, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(queue, envelope.LiveBinding("widget"), topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	msgs, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{
		store:      pgstore.New(storePool, nil),
		relayPool:  relayPool,
		topo:       topo,
		deliveries: make(chan received, 1000),
	}
	go func() {
		for d := range msgs {
			h.deliveries <- received{d: d, at: time.Now()}
		}
	}()

	pubConn, err := broker.Connect(amqpURL, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pubConn.Close() })
	pub, err := broker.NewPublisher(pubConn, broker.PublisherConfig{Exchange: topo.EventsExchange}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })

	c.Pool, c.Publisher, c.Topic = relayPool, pub, pgstore.OutboxTopic
	relay, err := outbox.NewForwarderRelay(c)
	if err != nil {
		t.Fatalf("NewWithConfig: %v", err)
	}
	h.relay = relay
	runCtx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- relay.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("relay Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("relay Run did not return after cancel")
		}
		_ = relay.Close()
	})
	select {
	case <-relay.Running():
	case err := <-runErr:
		t.Fatalf("relay stopped at start: %v", err)
	case <-time.After(deliveryWait):
		t.Fatal("relay did not start")
	}
	return h
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

func (h *harness) newWidget(t *testing.T) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := h.store.Pool().Exec(testCtx(t), `INSERT INTO widgets (id, state, version) VALUES ($1, 'initialized', 0)`, id); err != nil {
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

func (h *harness) commit(t *testing.T, id string, n int) []*envelope.Event {
	t.Helper()
	var events []*envelope.Event
	err := h.store.InTx(testCtx(t), func(ctx context.Context, tx *pgstore.Tx) error {
		var err error
		events, err = fire(ctx, tx, id, n)
		return err
	})
	if err != nil {
		t.Fatalf("InTx: %v", err)
	}
	return events
}

// holdOpen appends one transition to widget id in a transaction that stays
// open until the returned commit function is called.
func (h *harness) holdOpen(t *testing.T, id string) (*envelope.Event, func()) {
	t.Helper()
	appended := make(chan *envelope.Event, 1)
	release := make(chan struct{})
	done := make(chan error, 1)
	ctx := testCtx(t)
	go func() {
		done <- h.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
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
	var e *envelope.Event
	select {
	case e = <-appended:
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
	return e, commit
}

// relayPolled waits until the relay has started and finished at least one
// poll after this call: each poll locks the offsets row (SELECT ... FOR
// UPDATE in its own transaction), which changes the row's xmax.
func (h *harness) relayPolled(t *testing.T) {
	t.Helper()
	ctx := testCtx(t)
	xmax := func() string {
		var x string
		if err := h.store.Pool().QueryRow(ctx, `SELECT xmax::text FROM watermill_offsets_outbox WHERE consumer_group = 'relay'`).Scan(&x); err != nil {
			t.Fatalf("offsets row: %v", err)
		}
		return x
	}
	for range 2 {
		before := xmax()
		if !eventually(t, deliveryWait, func() bool { return xmax() != before }) {
			t.Fatal("the relay does not poll")
		}
	}
}

type nopPublisher struct{}

func (nopPublisher) Publish(string, ...*message.Message) error { return nil }
func (nopPublisher) Close() error                              { return nil }

// collect waits for n deliveries.
func (h *harness) collect(t *testing.T, n int) []received {
	t.Helper()
	var got []received
	for len(got) < n {
		select {
		case r := <-h.deliveries:
			got = append(got, r)
		case <-time.After(deliveryWait):
			t.Fatalf("received %d of %d events", len(got), n)
		}
	}
	return got
}

// noMore asserts nothing else arrives for a short while (no duplicates).
func (h *harness) noMore(t *testing.T) {
	t.Helper()
	select {
	case r := <-h.deliveries:
		t.Fatalf("unexpected extra delivery %s %s", r.d.RoutingKey, r.d.MessageId)
	case <-time.After(300 * time.Millisecond):
	}
}

func (h *harness) flush(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deliveryWait)
	defer cancel()
	if err := h.relay.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	n, err := h.relay.Pending(ctx)
	if err != nil || n != 0 {
		t.Fatalf("Pending after Flush = %d, %v; want 0", n, err)
	}
}

// checkDelivery asserts d is e on the wire as DESIGN §5 fixes it.
func checkDelivery(t *testing.T, d amqp091.Delivery, e *envelope.Event, exchange string) {
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
	if d.Exchange != exchange || d.RoutingKey != "widget."+e.Event {
		t.Errorf("%s: exchange %q routing key %q, want %q %q", e.ID, d.Exchange, d.RoutingKey, exchange, "widget."+e.Event)
	}
	if got, _ := d.Headers[envelope.HeaderCorrelationID].(string); got != e.CorrelationID {
		t.Errorf("%s: correlation_id header = %#v, want %q", e.ID, d.Headers[envelope.HeaderCorrelationID], e.CorrelationID)
	}
	if got, _ := d.Headers[envelope.HeaderSchemaVersion].(string); got != "1" {
		t.Errorf("%s: schema_version header = %#v, want \"1\"", e.ID, d.Headers[envelope.HeaderSchemaVersion])
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
	h := setup(t, outbox.Config{})
	a, b := h.newWidget(t), h.newWidget(t)

	// Many concurrent commands on two widgets: each serialises on its row
	// lock, so its versions must reach the consumer in order.
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
}

func TestRelayIdleLatency(t *testing.T) {
	t.Parallel()
	h := setup(t, outbox.Config{})
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
		lat := r.at.Sub(committed)
		if lat < 0 {
			lat = 0 // delivered before InTx returned to us
		}
		total += lat
		worst = max(worst, lat)
		if lat > 2*time.Second {
			t.Errorf("event %d took %v from commit to delivery while idle", i, lat)
		}
	}
	t.Logf("idle commit→delivery latency over %d events: mean %v, max %v (PollInterval default)", n, total/n, worst)
}

func TestPruneDeletesOnlyPublishedRows(t *testing.T) {
	t.Parallel()
	h := setup(t, outbox.Config{Retention: time.Nanosecond, PruneInterval: time.Hour})
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

	// A relay with the default retention (1h) deletes nothing yet.
	keep, err := outbox.NewForwarderRelay(outbox.Config{Pool: h.relayPool, Publisher: nopPublisher{}, Topic: pgstore.OutboxTopic})
	if err != nil {
		t.Fatal(err)
	}
	// Not closed: it never runs, and Close on a forwarder whose router never
	// ran waits for its CloseTimeout (10s). It holds no goroutines.
	if n, err := keep.Prune(ctx); err != nil || n != 0 {
		t.Fatalf("Prune with a 1h retention deleted %d rows (%v)", n, err)
	}

	// An open transaction has written its outbox row; a later one commits.
	// Neither is published: the relay waits for the older transaction.
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
}

func TestRelayDoesNotSkipAHeldTransaction(t *testing.T) {
	t.Parallel()
	h := setup(t, outbox.Config{})
	a, b := h.newWidget(t), h.newWidget(t)

	held, commitHeld := h.holdOpen(t, a)
	want := map[string]*envelope.Event{held.ID: held}
	for range 5 {
		for _, e := range h.commit(t, b, 1) {
			want[e.ID] = e
		}
	}
	// Let the relay poll after the later commits: it must not move past
	// the held transaction.
	h.relayPolled(t)
	t.Logf("deliveries before the held transaction committed: %d (the relay waits behind the oldest open transaction)", len(h.deliveries))

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
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	if _, err := outbox.NewForwarderRelay(outbox.Config{}); err == nil {
		t.Fatal("NewWithConfig accepted a config without pool, publisher and topic")
	}
	err := outbox.Config{PollInterval: -1}.Validate()
	if err == nil {
		t.Fatal("Validate accepted a negative interval")
	}
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) || len(joined.Unwrap()) < 4 {
		t.Fatalf("Validate should report every problem at once, got %v", err)
	}
}

// dumpOrder logs the arrival order next to the history's xids, to explain an
// order failure.
func (h *harness) dumpOrder(t *testing.T, got []received) {
	t.Helper()
	for i, r := range got {
		e, _ := envelope.Decode(r.d.Body)
		var xid string
		_ = h.store.Pool().QueryRow(testCtx(t), `SELECT transaction_id::text FROM history WHERE event_id = $1`, e.ID).Scan(&xid)
		t.Logf("#%02d %s v%-3d seq %-4d xid %s", i, e.EntityID[:8], e.Version, e.Sequence, xid)
	}
}

// A relay that starts while PostgreSQL is unreachable keeps trying, and
// relays once the database is back: it never stops the service.
func TestRelaySurvivesDatabaseDownAtStart(t *testing.T) {
	ctx := testCtx(t)
	dbURL := sandbox.Postgres(t)
	storePool := openPool(t, dbURL, 2)
	if err := pgstore.Migrate(ctx, storePool, pgstore.Framework()); err != nil {
		t.Fatal(err)
	}
	store := pgstore.New(storePool, nil)
	if err := store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		return tx.Append(ctx, widgetEvent(uuid.NewString(), 1, "create", "new", "created"))
	}); err != nil {
		t.Fatal(err)
	}

	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := sandbox.NewProxy(t, u.Host)
	proxy.Down()
	u.Host = proxy.Addr()
	relay, err := outbox.NewForwarderRelay(outbox.Config{Pool: openPool(t, u.String(), 2), Publisher: nopPublisher{}, Topic: pgstore.OutboxTopic})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- relay.Run(runCtx) }()
	defer func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// Let it fail at least twice: the first subscription and a retry.
	if !eventually(t, 20*time.Second, func() bool { return proxy.Accepted() >= 2 }) {
		t.Fatal("the relay never tried to reach the database")
	}
	proxy.Up()
	if !eventually(t, 20*time.Second, func() bool {
		select {
		case err := <-runErr:
			t.Fatalf("the relay stopped instead of waiting for the database: %v", err)
		default:
		}
		n, err := relay.Pending(ctx)
		return err == nil && n == 0
	}) {
		t.Fatal("the relay did not publish after the database came back")
	}
	select {
	case <-relay.Running():
	default:
		t.Fatal("Running not closed although the relay published")
	}
}
