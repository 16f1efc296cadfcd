package projection_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	pool, err := pgxpool.New(context.Background(), "postgres://nobody@127.0.0.1:1/none") // never used: lazy
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	valid := projection.Config{Name: "catalog-2", EntityTypes: []string{"widget"}, Projection: newWidgets(),
		Pool: pool, AMQPURL: "amqp://localhost/"}
	if err := valid.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	cases := map[string]struct {
		mutate func(*projection.Config)
		field  string
	}{
		"upper case name":      {func(c *projection.Config) { c.Name = "Catalog" }, "name"},
		"blank name":           {func(c *projection.Config) { c.Name = "" }, "name"},
		"name too long":        {func(c *projection.Config) { c.Name = "a" + strings.Repeat("b", 40) }, "name"},
		"name is entity type":  {func(c *projection.Config) { c.Name = "widget" }, "name"},
		"name is reserved":     {func(c *projection.Config) { c.Name = "replay" }, "name"},
		"no entity types":      {func(c *projection.Config) { c.EntityTypes = nil }, "entity_types"},
		"bad entity type":      {func(c *projection.Config) { c.EntityTypes = []string{"a.#"} }, "entity_types"},
		"no projection":        {func(c *projection.Config) { c.Projection = nil }, "projection"},
		"no pool":              {func(c *projection.Config) { c.Pool = nil }, "pool"},
		"no broker":            {func(c *projection.Config) { c.AMQPURL = "" }, "amqp_url"},
		"batch above prefetch": {func(c *projection.Config) { c.Prefetch, c.BatchSize = 10, 20 }, "batch_size"},
		"replay batch above prefetch": {
			func(c *projection.Config) { c.ReplayPrefetch, c.ReplayBatchSize = 10, 20 }, "replay_batch_size"},
		"replay messages too large": {
			func(c *projection.Config) { c.ReplayEventsPerMessage = replay.MaxBatch + 1 }, "replay_events_per_message"},
	}
	for name, tc := range cases {
		c := valid
		tc.mutate(&c)
		err := c.Validate()
		var ae *apperr.Error
		if !errors.As(err, &ae) || ae.Code != apperr.Invalid || ae.Fields[tc.field] == "" {
			t.Errorf("%s: Validate() = %v, want an Invalid error on %q", name, err, tc.field)
		}
		if _, err := projection.NewWorker(c); err == nil {
			t.Errorf("%s: NewWorker accepted it", name)
		}
	}
}

func TestActiveGenerationSQL(t *testing.T) {
	t.Parallel()
	got := projection.ActiveGenerationSQL("read-model", "catalog")
	want := `(SELECT active_generation FROM "read-model"."projection_state" WHERE name = 'catalog')`
	if got != want {
		t.Fatalf("ActiveGenerationSQL = %s, want %s", got, want)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("ActiveGenerationSQL accepted a name that could inject SQL")
		}
	}()
	projection.ActiveGenerationSQL("s", "x' OR '1'='1")
}

func TestLiveEventsAreAppliedInBatches(t *testing.T) {
	onEachBroker(t, testLiveEventsAreAppliedInBatches)
}

func testLiveEventsAreAppliedInBatches(t *testing.T, e *env) {
	w := e.startWorker(t, "", withSchema(sandbox.Name("rm")))

	var evs []envelope.Event
	for i := range 40 {
		evs = append(evs, widgetHistory(fmt.Sprintf("w%02d", i), 3)...)
	}
	e.publishLive(t, evs...)
	e.waitModel(t, w, expect(evs))

	var last time.Time
	for _, ev := range evs {
		if ev.OccurredAt.After(last) {
			last = ev.OccurredAt
		}
	}
	eventually(t, waitFor, "status", func() string {
		st := w.status(t)
		if st.Applied != int64(len(evs)) || !st.LastEventAt.Equal(last) || st.LagMessages != 0 || st.LagSeconds != 0 ||
			!st.Connected || st.ActiveGeneration != 1 || st.DeadLettered != 0 || st.Rebuild.State != projection.RebuildIdle {
			return fmt.Sprintf("%+v (want applied %d, last event at %s)", st, len(evs), last)
		}
		return ""
	})
	if got := w.counter(t, "statemill_projection_events_applied_total"); got != float64(len(evs)) {
		t.Errorf("events_applied_total = %v, want %d", got, len(evs))
	}
	if got := w.counter(t, "statemill_projection_batch_duration_seconds"); got != 0 {
		t.Errorf("the histogram read as a counter: %v", got) // sanity of the helper
	}

	// The topology: N.live and N.replay (lazy) dead-letter to N.dead
	// (declaring them with other arguments fails), N.dead is a fanout
	// exchange.
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	dead := amqp091.Table{"x-dead-letter-exchange": w.name + ".dead"}
	lazy := amqp091.Table{"x-dead-letter-exchange": w.name + ".dead", "x-queue-mode": "lazy"}
	for q, args := range map[string]amqp091.Table{w.name + ".live": dead, w.name + ".replay": lazy} {
		if _, err := ch.QueueDeclare(q, true, false, false, false, args); err != nil {
			t.Fatalf("%s is not durable with %v: %v", q, args, err)
		}
	}
	if err := ch.ExchangeDeclarePassive(w.name+".dead", amqp091.ExchangeFanout, true, false, false, false, nil); err != nil {
		t.Fatalf("exchange %s.dead: %v", w.name, err)
	}
	if _, err := ch.QueueDeclare(w.name+".live", true, false, false, false, nil); err == nil {
		t.Fatal("N.live accepted a declaration without its dead-letter exchange")
	}
}

func TestDuplicatesAndDisorderConverge(t *testing.T) {
	onEachBroker(t, testDuplicatesAndDisorderConverge)
}

func testDuplicatesAndDisorderConverge(t *testing.T, e *env) {
	w := e.startWorker(t, "")

	var evs []envelope.Event
	for i := range 50 {
		evs = append(evs, widgetHistory(fmt.Sprintf("w%02d", i), 4)...)
	}
	twice := append(slices.Clone(evs), evs...)
	rand.Shuffle(len(twice), func(i, j int) { twice[i], twice[j] = twice[j], twice[i] })
	e.publishLive(t, twice...)
	e.waitModel(t, w, expect(evs))
	eventually(t, waitFor, "the queue drains", func() string {
		if st := w.status(t); st.LagMessages != 0 || st.LagSeconds != 0 || st.Applied < int64(len(evs)) {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	// Nothing newer arrived meanwhile, so the model is exactly the newest
	// version of each widget, and it took no dead-lettering to get there.
	if msg := sameModel(e.model(t, w), expect(evs)); msg != "" {
		t.Fatal(msg)
	}
	if n := e.queueDepth(t, w.name+".dead"); n != 0 {
		t.Fatalf("%d messages dead-lettered", n)
	}
}

func TestPoisonIsDeadLetteredAndTheStreamGoesOn(t *testing.T) {
	onEachBroker(t, testPoisonIsDeadLetteredAndTheStreamGoesOn)
}

func testPoisonIsDeadLetteredAndTheStreamGoesOn(t *testing.T, e *env) {
	w := e.startWorker(t, "")

	before := widgetHistory("a", 2)
	refused := widgetEvent("b", 1, true)
	marker := widgetEvent("c", 1, false)
	marker.Event = "replay_started"
	oddHeaders := widgetEvent("d", 1, false)
	after := widgetHistory("e", 3)

	msgs := liveMsgs(before...)
	msgs = append(msgs,
		msg{key: "widget.create", p: amqp091.Publishing{MessageId: "garbage-1", Body: []byte(`{"id": not json`)}},
		msg{key: "widget.create", p: amqp091.Publishing{MessageId: "no-entity", Body: []byte(`{"id":"x","schema_version":1,"entity_type":"widget","version":1,"event":"create"}`)}},
	)
	msgs = append(msgs, liveMsgs(refused, widgetEvent("f", 1, false))...)
	msgs = append(msgs, eventMsg("widget.replay_started", marker, nil))
	// Headers of every AMQP type, as a dead-lettered or foreign message has
	// them (x-death is a table): decoding must not care.
	msgs = append(msgs, eventMsg(oddHeaders.RoutingKey(), oddHeaders, amqp091.Table{
		envelope.HeaderSchemaVersion: int32(1),
		envelope.HeaderReplayID:      int64(7),
		"x-death":                    []any{amqp091.Table{"count": int64(1), "reason": "rejected", "queue": "elsewhere"}},
		"flag":                       true,
		"ratio":                      1.5,
		"raw":                        []byte("bytes"),
		"when":                       time.Now().Truncate(time.Second),
	}))
	msgs = append(msgs, liveMsgs(after...)...)
	e.publish(t, msgs...)

	want := expect(before, after, []envelope.Event{widgetEvent("f", 1, false), oddHeaders})
	e.waitModel(t, w, want)

	dead := e.drain(t, w.name+".dead", 4)
	var got []string
	for _, d := range dead {
		got = append(got, d.MessageId)
	}
	slices.Sort(got)
	wantDead := []string{"garbage-1", "no-entity", refused.ID, marker.ID}
	slices.Sort(wantDead)
	if !slices.Equal(got, wantDead) {
		t.Fatalf("dead-lettered %v, want %v", got, wantDead)
	}
	if st := w.status(t); st.DeadLettered != 4 {
		t.Fatalf("status dead_lettered = %d, want 4", st.DeadLettered)
	}
	if got := w.counter(t, "statemill_projection_dead_lettered_total"); got != 4 {
		t.Fatalf("dead_lettered_total = %v, want 4", got)
	}

	// A dead-lettered message that comes back (an operator shovels N.dead
	// into N.live) carries x-death; it is judged again on its body alone.
	back := dead[slices.IndexFunc(dead, func(d amqp091.Delivery) bool { return d.MessageId == refused.ID })]
	if _, ok := back.Headers["x-death"]; !ok {
		t.Fatal("the dead-lettered message has no x-death header")
	}
	fixed := widgetEvent("b", 1, false)
	e.publish(t, eventMsg(fixed.RoutingKey(), fixed, amqp091.Table{"x-death": back.Headers["x-death"]}))
	want["b"] = widget{Version: 1, State: "s1"}
	e.waitModel(t, w, want)
}

func TestDatabaseOutageIsRetriedNeverDeadLettered(t *testing.T) {
	onEachBroker(t, testDatabaseOutageIsRetriedNeverDeadLettered)
}

func testDatabaseOutageIsRetriedNeverDeadLettered(t *testing.T, e *env) {
	proxy := sandbox.NewProxy(t, hostPort(t, e.dbURL))
	pool := openPool(t, withHost(t, e.dbURL, proxy.Addr()), 3)
	w := e.startWorker(t, "", withPool(pool))

	first := widgetHistory("a", 2)
	e.publishLive(t, first...)
	e.waitModel(t, w, expect(first))

	proxy.Down()
	var during []envelope.Event
	for i := range 30 {
		during = append(during, widgetHistory(fmt.Sprintf("d%02d", i), 2)...)
	}
	e.publishLive(t, during...)
	eventually(t, waitFor, "the worker retries while the database is down", func() string {
		if n := w.RetriesForTest(); n < 3 {
			return fmt.Sprintf("%d retries", n)
		}
		return ""
	})
	if _, err := w.Status(testCtx(t)); apperr.CodeOf(err) != apperr.Unavailable {
		t.Fatalf("Status with the database down: %v, want Unavailable", err)
	}
	proxy.Up()

	e.waitModel(t, w, expect(first, during))
	st := w.status(t)
	if st.DeadLettered != 0 || st.Applied != int64(len(first)+len(during)) {
		t.Fatalf("after the outage: %+v", st)
	}
	if n := e.queueDepth(t, w.name+".dead"); n != 0 {
		t.Fatalf("%d messages dead-lettered during a database outage", n)
	}
}

func TestBrokerConnectionLossMidStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	proxy := sandbox.NewProxy(t, hostPort(t, e.amqpURL))
	proj := newWidgets()
	// Slow batches, so the stream is still flowing when the connection drops.
	proj.setHook(func(int64, []envelope.Event) error { time.Sleep(15 * time.Millisecond); return nil })
	w := e.startWorker(t, "", withAMQP(withHost(t, e.amqpURL, proxy.Addr())), withProjection(proj), withBatch(20, 10))

	var evs []envelope.Event
	for i := range 100 {
		evs = append(evs, widgetHistory(fmt.Sprintf("w%03d", i), 3)...)
	}
	rand.Shuffle(len(evs), func(i, j int) { evs[i], evs[j] = evs[j], evs[i] })
	e.publishLive(t, evs...)
	eventually(t, waitFor, "the stream is flowing", func() string {
		if n := len(e.model(t, w)); n < 10 {
			return fmt.Sprintf("%d widgets", n)
		}
		return ""
	})
	proxy.Down()
	eventually(t, waitFor, "the worker notices", func() string {
		if st := w.status(t); st.Connected || st.LagMessages != -1 {
			return fmt.Sprintf("connected=%v lag_messages=%d", st.Connected, st.LagMessages)
		}
		return ""
	})
	if n := len(e.model(t, w)); n == 100 {
		t.Fatal("the stream had finished before the connection dropped; the test proves nothing")
	}
	more := widgetHistory("late", 2)
	e.publishLive(t, more...) // straight to the broker, while the worker is cut off
	proxy.Up()

	e.waitModel(t, w, expect(evs, more))
	eventually(t, waitFor, "reconnected", func() string {
		st := w.status(t)
		if !st.Connected || w.ReconnectsForTest() < 1 || st.LagMessages != 0 || st.DeadLettered != 0 {
			return fmt.Sprintf("%+v reconnects=%d", st, w.ReconnectsForTest())
		}
		return ""
	})
	if got := w.counter(t, "statemill_projection_broker_reconnects_total"); got < 1 {
		t.Fatalf("broker_reconnects_total = %v", got)
	}
}

func TestLagIsReported(t *testing.T) { onEachBroker(t, testLagIsReported) }

func testLagIsReported(t *testing.T, e *env) {
	proj := newWidgets()
	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)
	proj.setHook(func(int64, []envelope.Event) error { <-gate; return nil })
	w := e.startWorker(t, "", withProjection(proj), withBatch(10, 10))

	var evs []envelope.Event
	for i := range 50 {
		ev := widgetEvent(fmt.Sprintf("w%02d", i), 1, false)
		ev.OccurredAt = ev.OccurredAt.Add(-time.Minute) // an old event: the lag is at least a minute
		evs = append(evs, ev)
	}
	e.publishLive(t, evs...)
	eventually(t, waitFor, "lag while the projection is stuck", func() string {
		st := w.status(t)
		// 10 delivered (the prefetch), 40 ready.
		if st.LagMessages != 40 || st.LagSeconds < 60 || st.Applied != 0 {
			return fmt.Sprintf("lag_messages=%d lag_seconds=%.1f applied=%d", st.LagMessages, st.LagSeconds, st.Applied)
		}
		return ""
	})
	release()
	e.waitModel(t, w, expect(evs))
	eventually(t, waitFor, "no lag", func() string {
		if st := w.status(t); st.LagMessages != 0 || st.LagSeconds != 0 || st.Applied != 50 {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
}

func TestSharedTopologyNeedNotExistYet(t *testing.T) {
	onEachBroker(t, testSharedTopologyNeedNotExistYet)
}

func testSharedTopologyNeedNotExistYet(t *testing.T, e *env) {
	// A worker started before any producer declared the exchanges declares
	// them itself (identically) and binds.
	topo := broker.Topology{EventsExchange: e.ns + ".other-events", CommandsExchange: e.ns + ".other-commands"}
	sandbox.DeleteLater(t, []string{topo.UnroutableQueue()}, []string{topo.EventsExchange, topo.CommandsExchange, topo.UnroutableExchange()})
	w := e.startWorker(t, "", withConfig(func(c *projection.Config) { c.Topology = topo }))
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := broker.DeclareShared(ch, topo); err != nil {
		t.Fatalf("the producer's declaration conflicts with the worker's: %v", err)
	}
	if st := w.status(t); !st.Connected {
		t.Fatalf("%+v", st)
	}
}

func TestMetricsToleratePeersInOneRegistry(t *testing.T) {
	t.Parallel()
	pool, err := pgxpool.New(context.Background(), "postgres://nobody@127.0.0.1:1/none") // never used: lazy
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	reg := prometheus.NewRegistry()
	for _, name := range []string{"alpha", "beta", "alpha"} { // two projections, and one twice (a restart)
		_, err := projection.NewWorker(projection.Config{Name: name, EntityTypes: []string{"widget"}, Projection: newWidgets(),
			Pool: pool, AMQPURL: "amqp://localhost/", Registerer: reg})
		if err != nil {
			t.Fatalf("NewWorker %s: %v", name, err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, want := range []string{"statemill_projection_events_applied_total", "statemill_projection_dead_lettered_total",
		"statemill_projection_batch_duration_seconds", "statemill_projection_lag_messages", "statemill_projection_lag_seconds"} {
		if !names[want] {
			t.Errorf("metric %s is not registered (have %v)", want, names)
		}
	}
}
