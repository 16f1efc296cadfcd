// Package relaytest is the conformance suite every outbox relay passes, in
// the spirit of Watermill's shared pub/sub tests: PipelinedRelay over
// PostgreSQL and SequentialRelay over SQLite run the same cases, on RabbitMQ
// and on the in-process broker.
package relaytest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
)

// Harness is one relay implementation over a fresh, isolated outbox.
type Harness struct {
	// Exchange is a topic exchange that exists on the broker Dial reaches.
	Exchange string
	// Dial opens connections to that broker. The suite consumes with it and
	// hands the relay a copy whose connections it can cut.
	Dial broker.Dialer
	// Commit appends events in one transaction that commits.
	Commit func(ctx context.Context, events ...*envelope.Event) error
	// Abort appends events in one transaction that rolls back.
	Abort func(ctx context.Context, events ...*envelope.Event) error
	// NewRelay returns a relay over the outbox, not yet running, that
	// publishes to Exchange through dial.
	NewRelay func(t *testing.T, dial broker.Dialer) outbox.Relay
}

// Deadline bounds every wait of the suite: generous, for -race on a small,
// busy machine.
const Deadline = 60 * time.Second

// Run runs every case against the relays newHarness builds.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	cases := []struct {
		name string
		test func(t *testing.T, h Harness)
	}{
		{"DeliversEveryEventInCommitOrder", testOrder},
		{"PublishesNothingRolledBack", testRollback},
		{"PendingAndFlush", testPendingAndFlush},
		{"ResumesAfterRestart", testRestart},
		{"SurvivesBrokerDrops", testBrokerDrops},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.test(t, newHarness(t))
		})
	}
}

// newEvent is version v of entity id.
func newEvent(id string, v int64) *envelope.Event {
	return &envelope.Event{
		ID: uuid.NewString(), SchemaVersion: envelope.SchemaVersion, EntityType: "relaytest", EntityID: id, Version: v,
		Event: fmt.Sprintf("step%d", v), From: fmt.Sprintf("s%d", v-1), To: fmt.Sprintf("s%d", v),
		Attributes: json.RawMessage(`{"n":1}`), CorrelationID: "corr-" + id[:8], OccurredAt: time.Now(),
	}
}

// received collects what a consumer of the exchange got.
type received struct {
	mu   sync.Mutex
	all  []amqp091.Delivery
	cond chan struct{} // closed and replaced on every delivery
}

func (r *received) add(d amqp091.Delivery) {
	r.mu.Lock()
	r.all = append(r.all, d)
	close(r.cond)
	r.cond = make(chan struct{})
	r.mu.Unlock()
}

func (r *received) snapshot() ([]amqp091.Delivery, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]amqp091.Delivery(nil), r.all...), r.cond
}

// waitFor waits until every id in want arrived at least once.
func (r *received) waitFor(t *testing.T, want map[string]bool) []amqp091.Delivery {
	t.Helper()
	deadline := time.After(Deadline)
	for {
		all, changed := r.snapshot()
		seen := map[string]bool{}
		for _, d := range all {
			seen[d.MessageId] = true
		}
		missing := 0
		for id := range want {
			if !seen[id] {
				missing++
			}
		}
		if missing == 0 {
			return all
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("%d of %d events never arrived (%d deliveries)", missing, len(want), len(all))
		}
	}
}

// consume binds a fresh queue to every routing key of the exchange.
func consume(t *testing.T, h Harness) *received {
	t.Helper()
	conn, err := h.Dial("relaytest-consumer")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatalf("declare queue: %v", err)
	}
	if err := ch.QueueBind(q.Name, "#", h.Exchange, false, nil); err != nil {
		t.Fatalf("bind: %v", err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	r := &received{cond: make(chan struct{})}
	go func() {
		for d := range deliveries {
			r.add(d)
		}
	}()
	return r
}

// cuttable dials through h.Dial and can close every connection it opened,
// as a broker restart or a network cut would.
type cuttable struct {
	dial  broker.Dialer
	mu    sync.Mutex
	conns []broker.Conn
	dials int
}

func (c *cuttable) Dial(name string) (broker.Conn, error) {
	conn, err := c.dial(name)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	c.dials++
	c.mu.Unlock()
	return conn, nil
}

func (c *cuttable) cut() {
	c.mu.Lock()
	conns := c.conns
	c.conns = nil
	c.mu.Unlock()
	for _, conn := range conns {
		_ = conn.Close()
	}
}

// start runs r until the test ends (or stop is called) and returns stop,
// which waits for Run to return.
func start(t *testing.T, r outbox.Relay) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("relay Run: %v", err)
				}
			case <-time.After(Deadline):
				t.Error("relay did not stop")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), Deadline)
	t.Cleanup(cancel)
	return ctx
}

// commitEntities commits versions 1..versions of entities new entities, one
// transaction per version, writers entities at a time, and returns the
// events by entity in version order.
func commitEntities(t *testing.T, h Harness, entities, versions int) map[string][]*envelope.Event {
	t.Helper()
	out, err := commit(ctxFor(t), h, entities, versions)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// commit is commitEntities for any goroutine.
func commit(ctx context.Context, h Harness, entities, versions int) (map[string][]*envelope.Event, error) {
	out := map[string][]*envelope.Event{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, entities)
	for range entities {
		id := uuid.NewString()
		wg.Go(func() {
			for v := int64(1); v <= int64(versions); v++ {
				e := newEvent(id, v)
				if err := h.Commit(ctx, e); err != nil {
					errs <- fmt.Errorf("commit %s v%d: %w", id, v, err)
					return
				}
				mu.Lock()
				out[id] = append(out[id], e)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	return out, <-errs // nil when the channel is empty
}

func ids(byEntity map[string][]*envelope.Event) map[string]bool {
	want := map[string]bool{}
	for _, evs := range byEntity {
		for _, e := range evs {
			want[e.ID] = true
		}
	}
	return want
}

// checkOrder checks that each entity's events first arrived in version
// order (a batch published again after a failure repeats, it does not
// reorder) and that each message carries the wire properties.
func checkOrder(t *testing.T, byEntity map[string][]*envelope.Event, all []amqp091.Delivery) {
	t.Helper()
	byID := map[string]*envelope.Event{}
	for _, evs := range byEntity {
		for _, e := range evs {
			byID[e.ID] = e
		}
	}
	first := map[string]bool{}
	next := map[string]int64{}
	for _, d := range all {
		e, ok := byID[d.MessageId]
		if !ok || first[d.MessageId] {
			continue
		}
		first[d.MessageId] = true
		if want := next[e.EntityID] + 1; e.Version != want {
			t.Fatalf("entity %s: version %d arrived first where %d was due", e.EntityID, e.Version, want)
		}
		next[e.EntityID] = e.Version
		if d.RoutingKey != e.RoutingKey() {
			t.Fatalf("event %s: routing key %q, want %q", e.ID, d.RoutingKey, e.RoutingKey())
		}
		if d.CorrelationId != e.CorrelationID || d.ContentType != "application/json" || d.DeliveryMode != amqp091.Persistent {
			t.Fatalf("event %s: properties correlation %q content type %q delivery mode %d", e.ID, d.CorrelationId, d.ContentType, d.DeliveryMode)
		}
		var got envelope.Event
		if err := json.Unmarshal(d.Body, &got); err != nil {
			t.Fatalf("event %s: body: %v", e.ID, err)
		}
		if got.ID != e.ID || got.Version != e.Version || got.Sequence == 0 || got.Sequence != e.Sequence {
			t.Fatalf("event %s: body id %s version %d sequence %d, want version %d sequence %d",
				e.ID, got.ID, got.Version, got.Sequence, e.Version, e.Sequence)
		}
	}
}

func testOrder(t *testing.T, h Harness) {
	r := consume(t, h)
	start(t, h.NewRelay(t, h.Dial))
	byEntity := commitEntities(t, h, 8, 12)
	checkOrder(t, byEntity, r.waitFor(t, ids(byEntity)))
}

func testRollback(t *testing.T, h Harness) {
	ctx := ctxFor(t)
	r := consume(t, h)
	start(t, h.NewRelay(t, h.Dial))
	aborted := newEvent(uuid.NewString(), 1)
	if err := h.Abort(ctx, aborted); err == nil {
		t.Fatal("Abort reported a commit")
	}
	after := commitEntities(t, h, 1, 3)
	all := r.waitFor(t, ids(after))
	for _, d := range all {
		if d.MessageId == aborted.ID {
			t.Fatal("an event of a rolled-back transaction was published")
		}
	}
}

func testPendingAndFlush(t *testing.T, h Harness) {
	ctx := ctxFor(t)
	r := consume(t, h)
	relay := h.NewRelay(t, h.Dial)
	byEntity := commitEntities(t, h, 4, 5)
	if n, err := relay.Pending(ctx); err != nil || n != 20 {
		t.Fatalf("Pending before the relay runs = %d, %v; want 20", n, err)
	}
	start(t, relay)
	if err := relay.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if n, err := relay.Pending(ctx); err != nil || n != 0 {
		t.Fatalf("Pending after Flush = %d, %v; want 0", n, err)
	}
	checkOrder(t, byEntity, r.waitFor(t, ids(byEntity)))
}

func testRestart(t *testing.T, h Harness) {
	ctx := ctxFor(t)
	r := consume(t, h)
	first := h.NewRelay(t, h.Dial)
	stop := start(t, first)
	before := commitEntities(t, h, 3, 10)
	if err := first.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	r.waitFor(t, ids(before))
	stop()

	after := commitEntities(t, h, 3, 10)
	second := h.NewRelay(t, h.Dial)
	start(t, second)
	if err := second.Flush(ctx); err != nil {
		t.Fatalf("Flush after restart: %v", err)
	}
	all := r.waitFor(t, ids(after))
	count := map[string]int{}
	for _, d := range all {
		count[d.MessageId]++
	}
	for id := range ids(before) {
		if count[id] != 1 {
			t.Fatalf("event %s, flushed before the restart, arrived %d times", id, count[id])
		}
	}
	checkOrder(t, after, all)
}

func testBrokerDrops(t *testing.T, h Harness) {
	r := consume(t, h)
	dialer := &cuttable{dial: h.Dial}
	start(t, h.NewRelay(t, dialer.Dial))

	// Writers commit while the relay's connections are cut three times,
	// each after more events arrived.
	type result struct {
		byEntity map[string][]*envelope.Event
		err      error
	}
	done := make(chan result, 1)
	ctx := ctxFor(t)
	go func() {
		byEntity, err := commit(ctx, h, 6, 40)
		done <- result{byEntity, err}
	}()
	for cut := 1; cut <= 3; cut++ {
		deadline := time.After(Deadline)
		for {
			all, changed := r.snapshot()
			if len(all) >= cut*40 {
				break
			}
			select {
			case <-changed:
			case <-deadline:
				t.Fatalf("cut %d: only %d deliveries", cut, len(all))
			}
		}
		dialer.cut()
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	// One more event after the last cut: the relay must reconnect for it.
	last := commitEntities(t, h, 1, 1)
	for id, evs := range last {
		res.byEntity[id] = evs
	}
	checkOrder(t, res.byEntity, r.waitFor(t, ids(res.byEntity)))
	dialer.mu.Lock()
	dials := dialer.dials
	dialer.mu.Unlock()
	if dials < 2 {
		t.Fatalf("the relay dialled %d times; the cuts should have made it reconnect", dials)
	}
}
