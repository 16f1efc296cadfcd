package replay_test

import (
	"context"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

// Transactions committing while a replay takes its snapshot are each either
// in the replay or invisible in its cursor, never both and never neither:
// a replay after that cursor returns exactly the rest, and a consumer bound
// before asking receives the rest live.
func TestSnapshotRace(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startRelay(t)
	live := e.observe(t, envelope.LiveBinding("widget"))
	obs := e.observe(t, envelope.ReplayBinding("race", "widget"))
	r := e.start(t)

	// Writers on a pool of their own, each on its own widget, committing as
	// fast as they can until told to stop.
	const writers = 4
	store := pgstore.New(openPool(t, e.dbURL, writers+1), nil)
	ctx := testCtx(t)
	var committed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range writers {
		w := e.newWidget(t)
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
					_, err := fire(ctx, tx, w, 1+i%2)
					return err
				})
				if err != nil {
					t.Errorf("writer: %v", err)
					return
				}
				committed.Add(1)
			}
		})
	}
	stopWriters := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopWriters)
	eventually(t, waitLong, "writers committing", func() bool { return committed.Load() >= 20 })

	// One transaction holds its xid across the snapshot, committing after it.
	held := e.newWidget(t)
	appended, release, heldDone := make(chan []*envelope.Event, 1), make(chan struct{}), make(chan error, 1)
	go func() {
		heldDone <- store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
			events, err := fire(ctx, tx, held, 2)
			if err != nil {
				return err
			}
			appended <- events
			<-release
			return nil
		})
	}()
	var heldEvents []*envelope.Event
	select {
	case heldEvents = <-appended:
	case err := <-heldDone:
		t.Fatalf("held transaction: %v", err)
	case <-time.After(waitLong):
		t.Fatal("held transaction did not append")
	}

	a := submit(t, r, replay.Request{Prefix: "race", EntityType: "widget"})
	eventually(t, waitLong, "replay A's snapshot", func() bool { return obs.replayOf(t, a).starts == 1 })
	atStart := committed.Load()
	eventually(t, waitLong, "commits after the snapshot", func() bool { return committed.Load() >= atStart+20 })
	close(release)
	if err := <-heldDone; err != nil {
		t.Fatalf("held transaction: %v", err)
	}
	stopWriters()

	ra := obs.collect(t, a)
	rb := obs.collect(t, submit(t, r, replay.Request{Prefix: "race", EntityType: "widget", After: ra.completed.Cursor}))
	all := e.historyIDs(t, "")
	inA, inB := distinct(ra.ids), distinct(rb.ids)
	if len(inA) != len(ra.ids) || len(inB) != len(rb.ids) {
		t.Fatalf("a replay sent an event twice")
	}
	for id := range inA {
		if inB[id] {
			t.Errorf("%s is in the replay and after its cursor", id)
		}
	}
	for _, id := range all {
		if !inA[id] && !inB[id] {
			t.Errorf("%s is neither in the replay nor after its cursor", id)
		}
	}
	if len(inA)+len(inB) != len(all) {
		t.Fatalf("replay %d + after %d events, history holds %d", len(inA), len(inB), len(all))
	}
	for _, ev := range heldEvents {
		if !inB[ev.ID] {
			t.Errorf("the transaction in progress at the snapshot (%s) is not after the cursor", ev.ID)
		}
	}
	cur, err := replay.ParseCursor(ra.completed.Cursor)
	if err != nil {
		t.Fatal(err)
	}
	visible := e.historyIDs(t, "AND pg_visible_in_snapshot(transaction_id, $1::text::pg_snapshot)", cur.Snapshot)
	if !slices.Equal(ra.ids, visible) {
		t.Fatalf("replay A sent %d events; its snapshot sees %d", len(ra.ids), len(visible))
	}
	if len(inB) <= len(heldEvents) {
		t.Fatalf("only %d events after the cursor: the writers did not race the snapshot", len(inB))
	}
	// What the replay did not send reaches the consumer live.
	eventually(t, waitLong, "every transition live", func() bool { return live.n() >= len(all) })
	liveIDs := map[string]bool{}
	for _, d := range live.all() {
		liveIDs[d.MessageId] = true
	}
	for id := range inB {
		if !liveIDs[id] {
			t.Errorf("%s is after the cursor but never arrived live", id)
		}
	}
	t.Logf("%d transitions: %d in the replay, %d after its cursor (%d commits during the snapshot)",
		len(all), len(inA), len(inB), committed.Load()-atStart)
}

// Requests over AMQP are recorded, acked and run; requests that can never
// run are dead-lettered once and never loop; a duplicate runs once.
func TestRequestsOverAMQP(t *testing.T) { onEachBroker(t, testRequestsOverAMQP) }

func testRequestsOverAMQP(t *testing.T, e *env) {
	obs := e.observe(t, envelope.ReplayBinding("amqp", "widget"), envelope.ReplayBinding("nope", "widget"))
	r := e.start(t)
	e.commit(t, e.newWidget(t), 2)

	ch := e.channel(t)
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	publish := func(body string) {
		t.Helper()
		dc, err := ch.Publish(ctx, e.topo.CommandsExchange, replay.RequestRoutingKey, false,
			amqp091.Publishing{ContentType: "application/json", DeliveryMode: amqp091.Persistent, Body: []byte(body)})
		if err != nil {
			t.Fatal(err)
		}
		waitConfirm(t, ctx, dc)
	}
	good := uuid.NewString()
	publish(`not json`)
	publish(`{"prefix":"widget","entity_type":"widget"}`)
	publish(`{"replay_id":"` + uuid.NewString() + `","prefix":"nope","entity_type":"widget","mode":"sideways"}`)
	publish(`{"replay_id":"` + good + `","prefix":"amqp","entity_type":"widget"}`)
	publish(`{"replay_id":"` + good + `","prefix":"amqp","entity_type":"widget"}`)

	got := obs.collect(t, good)
	if got.completed.Count != 2 {
		t.Fatalf("count %d, want 2", got.completed.Count)
	}
	depth := func(q string) int {
		st, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
		if err != nil {
			t.Fatalf("inspect %s: %v", q, err)
		}
		return st.Messages
	}
	eventually(t, waitLong, "three dead-lettered requests", func() bool { return depth(r.DeadQueue()) == 3 })
	never(t, quietWindow, "a request looped, ran twice, or was left in the queue", func() bool {
		return depth(r.DeadQueue()) != 3 || depth(e.queue) != 0 || obs.replayOf(t, good).starts != 1 ||
			len(obs.all()) != len(got.events)+2
	})
	// Consumed rather than taken with basic.get, which the in-process
	// broker does not implement.
	dead, err := ch.Consume(r.DeadQueue(), "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		var d amqp091.Delivery
		select {
		case d = <-dead:
		case <-time.After(waitLong):
			t.Fatal("a dead letter did not arrive")
		}
		deaths, _ := d.Headers["x-death"].([]any)
		if len(deaths) != 1 {
			t.Fatalf("dead letter %s without one x-death: %v", d.Body, d.Headers)
		}
		if death, _ := deaths[0].(amqp091.Table); death["count"] != int64(1) || death["reason"] != "rejected" {
			t.Fatalf("dead letter %s died %v", d.Body, death)
		}
	}
}

// Requests a stopped or dead responder left behind are resumed: pending
// ones, and running ones whose heartbeat went stale (from their pinned
// cursor, so they send exactly what the first attempt set out to send). A
// running request with a fresh heartbeat is left to its owner until it
// goes stale.
func TestResumesUnfinishedRequests(t *testing.T) { onEachBroker(t, testResumesUnfinishedRequests) }

func testResumesUnfinishedRequests(t *testing.T, e *env) {
	obs := e.observe(t, "#")
	ctx := testCtx(t)
	w := e.newWidget(t)
	batch1 := e.commit(t, w, 3)
	var snap string
	if err := e.pool.QueryRow(ctx, `SELECT pg_current_snapshot()::text`).Scan(&snap); err != nil {
		t.Fatal(err)
	}
	pinned := replay.Cursor{Snapshot: snap}.String()
	e.commit(t, w, 2)

	pending, stale, fresh := uuid.NewString(), uuid.NewString(), uuid.NewString()
	var freshBeat time.Time
	err := e.pool.QueryRow(ctx, `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, mode, status, "cursor", attempts, started_at, heartbeat_at)
		VALUES ($1, 'pend', 'widget', 'full', 'pending', NULL, 0, NULL, NULL),
		       ($2, 'stale', 'widget', 'full', 'running', $4, 1, now() - interval '1 hour', now() - interval '1 hour'),
		       ($3, 'fresh', 'widget', 'full', 'running', NULL, 1, now(), now())
		RETURNING (SELECT now())`, pending, stale, fresh, pinned).Scan(&freshBeat)
	if err != nil {
		t.Fatal(err)
	}
	const staleAfter = 2 * time.Second
	r := e.start(t, func(c *replay.Config) { c.Heartbeat = 200 * time.Millisecond; c.StaleAfter = staleAfter })

	if got := obs.collect(t, pending); got.completed.Count != 5 {
		t.Fatalf("pending request replayed %d events, want 5", got.completed.Count)
	}
	got := obs.collect(t, stale)
	if got.completed.Cursor != pinned || !slices.Equal(got.ids, []string{batch1[0].ID, batch1[1].ID, batch1[2].ID}) {
		t.Fatalf("stale request resumed with cursor %q and %d events; want the pinned cursor and batch 1", got.completed.Cursor, len(got.ids))
	}
	if rec := waitStatus(t, r, stale, replay.StatusDone); rec.Attempts != 2 {
		t.Fatalf("resumed request counts %d attempts, want 2", rec.Attempts)
	}
	rec := waitStatus(t, r, fresh, replay.StatusDone)
	if rec.FinishedAt.Sub(freshBeat) < staleAfter {
		t.Fatalf("a request with a fresh heartbeat was taken over after %s, before it went stale", rec.FinishedAt.Sub(freshBeat))
	}
	if got := obs.collect(t, fresh); got.completed.Count != 5 {
		t.Fatalf("taken-over request replayed %d events, want 5", got.completed.Count)
	}
}

// Finished requests are forgotten after the retention; unfinished and
// recent ones stay.
func TestPrunesOldFinishedRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	old, recent, unfinished := uuid.NewString(), uuid.NewString(), uuid.NewString()
	_, err := e.pool.Exec(testCtx(t), `
		INSERT INTO replay_requests (replay_id, prefix, entity_type, mode, status, finished_at, heartbeat_at)
		VALUES ($1, 'a', 'widget', 'full', 'done', now() - interval '2 hours', now() - interval '2 hours'),
		       ($2, 'a', 'widget', 'full', 'failed', now(), now()),
		       ($3, 'a', 'widget', 'full', 'running', NULL, now())`, old, recent, unfinished)
	if err != nil {
		t.Fatal(err)
	}
	r := e.start(t, func(c *replay.Config) { c.Retention = time.Hour })
	eventually(t, waitLong, "the old request pruned", func() bool {
		_, err := r.Get(testCtx(t), old)
		return apperr.CodeOf(err) == apperr.NotFound
	})
	for _, id := range []string{recent, unfinished} {
		if _, err := r.Get(testCtx(t), id); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
}

// Stopping the responder mid-replay hands the request back; the next start
// resumes it from the same snapshot: transitions committed in between are
// not part of it.
func TestStopMidReplayResumesFromThePinnedCursor(t *testing.T) {
	t.Parallel()
	const n = 30000
	e := newEnv(t)
	e.bulk(t, n)
	obs := e.observe(t, envelope.ReplayBinding("long", "widget"))
	first := e.start(t, func(c *replay.Config) { c.Workers = 1 })
	id := submit(t, first, replay.Request{Prefix: "long", EntityType: "widget"})
	eventually(t, waitLong, "the replay under way", func() bool { return len(obs.replayOf(t, id).ids) >= 1000 })
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	rec, err := first.Get(testCtx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != replay.StatusPending || rec.Cursor == "" || rec.Attempts != 1 {
		t.Fatalf("after the stop the request is %+v; want pending with its cursor pinned", rec)
	}
	later := e.commit(t, e.newWidget(t), 2)

	second := e.start(t, func(c *replay.Config) { c.Workers = 1 })
	got := obs.collect(t, id)
	if got.completed.Count != n || got.completed.Cursor != rec.Cursor {
		t.Fatalf("resumed replay: count %d cursor %q; want %d and %q", got.completed.Count, got.completed.Cursor, n, rec.Cursor)
	}
	ids := distinct(got.ids)
	for _, ev := range later {
		if ids[ev.ID] {
			t.Fatalf("%s, committed after the pinned snapshot, was replayed", ev.ID)
		}
	}
	if rec := waitStatus(t, second, id, replay.StatusDone); rec.Attempts != 2 {
		t.Fatalf("attempts %d, want 2", rec.Attempts)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for name, c := range map[string]replay.Config{
		"empty":               {},
		"no pool":             e.config(func(c *replay.Config) { c.Pool = nil }),
		"no broker":           e.config(func(c *replay.Config) { c.AMQPURL = "" }),
		"no entity types":     e.config(func(c *replay.Config) { c.EntityTypes = nil }),
		"bad entity type":     e.config(func(c *replay.Config) { c.EntityTypes = []string{"Widget"} }),
		"no queue":            e.config(func(c *replay.Config) { c.QueueName = "" }),
		"workers exceed pool": e.config(func(c *replay.Config) { c.Workers = 5 }),
		"negative window":     e.config(func(c *replay.Config) { c.Window = -1 }),
		"stale before beat":   e.config(func(c *replay.Config) { c.Heartbeat = time.Second; c.StaleAfter = time.Second }),
	} {
		if _, err := replay.NewResponder(c); err == nil {
			t.Errorf("%s: NewResponder accepted %+v", name, c)
		}
	}
	r, err := replay.NewResponder(e.config())
	if err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if _, err := replay.NewResponder(e.config(func(c *replay.Config) { c.AMQPURL, c.Dial = "", broker.AMQPDialer(e.amqpURL) })); err != nil {
		t.Fatalf("a Dial instead of AMQPURL refused: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	select {
	case <-r.Ready():
	case <-time.After(waitLong):
		t.Fatal("not ready")
	}
	if err := r.Run(ctx); err == nil {
		t.Error("a second Run was accepted")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after cancel: %v", err)
		}
	case <-time.After(waitLong):
		t.Fatal("Run did not return after cancel")
	}
}

// A request queue declared elsewhere without the dead-letter arguments (a
// definitions file) is used as it is rather than refused forever.
func TestRequestQueueDeclaredElsewhere(t *testing.T) {
	onEachBroker(t, testRequestQueueDeclaredElsewhere)
}

func testRequestQueueDeclaredElsewhere(t *testing.T, e *env) {
	ch := e.channel(t)
	if _, err := ch.QueueDeclare(e.queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	obs := e.observe(t, envelope.ReplayBinding("defs", "widget"))
	e.start(t)
	e.commit(t, e.newWidget(t), 1)
	id := uuid.NewString()
	e.publishRequest(t, `{"replay_id":"`+id+`","prefix":"defs","entity_type":"widget"}`)
	if got := obs.collect(t, id); got.completed.Count != 1 {
		t.Fatalf("count %d, want 1", got.completed.Count)
	}
}

// publishRequest sends a request to the commands exchange with a confirm.
func (e *env) publishRequest(t *testing.T, body string) {
	t.Helper()
	ch := e.channel(t)
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	dc, err := ch.Publish(ctx, e.topo.CommandsExchange, replay.RequestRoutingKey, false,
		amqp091.Publishing{ContentType: "application/json", DeliveryMode: amqp091.Persistent, Body: []byte(body)})
	if err != nil {
		t.Fatal(err)
	}
	waitConfirm(t, ctx, dc)
}

// waitConfirm fails t unless the broker acks the publish of dc.
func waitConfirm(t *testing.T, ctx context.Context, dc broker.Confirmation) {
	t.Helper()
	select {
	case <-dc.Done():
	case <-ctx.Done():
		t.Fatalf("request not confirmed: %v", ctx.Err())
	}
	if !dc.Acked() {
		t.Fatal("request not confirmed: nacked")
	}
}

// When the broker goes away mid-replay, the replay is retried from its
// pinned cursor and completes, and the request consumer reconnects.
func TestSurvivesABrokerOutage(t *testing.T) {
	t.Parallel()
	const n = 20000
	e := newEnv(t)
	e.bulk(t, n)
	u, err := url.Parse(e.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := sandbox.NewProxy(t, u.Host)
	u.Host = proxy.Addr()
	obs := e.observe(t, envelope.ReplayBinding("cut", "widget"), envelope.ReplayBinding("cut", "gadget"))
	r := e.start(t, func(c *replay.Config) { c.AMQPURL = u.String(); c.Workers = 1 })

	id := submit(t, r, replay.Request{Prefix: "cut", EntityType: "widget"})
	eventually(t, waitLong, "the replay under way", func() bool { return len(obs.replayOf(t, id).ids) >= 1000 })
	proxy.Down()
	proxy.Up()
	got := obs.collect(t, id)
	if got.completed.Count != n {
		t.Fatalf("count %d, want %d", got.completed.Count, n)
	}
	rec := waitStatus(t, r, id, replay.StatusDone)
	if rec.Attempts < 2 || rec.Cursor != got.completed.Cursor {
		t.Fatalf("record %+v: want a retried attempt that kept its cursor", rec)
	}
	again := uuid.NewString()
	e.publishRequest(t, `{"replay_id":"`+again+`","prefix":"cut","entity_type":"gadget"}`)
	if got := obs.collect(t, again); got.completed.Count != 0 {
		t.Fatalf("gadget replay count %d", got.completed.Count)
	}
}
