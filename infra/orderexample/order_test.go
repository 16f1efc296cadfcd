package orderexample_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/infra/statemachine"
)

// The order machine: placed → paid → shipped, and cancel before shipping.
var orderMachine = statemachine.Definition{
	Name: "order", Initial: "new",
	States: []string{"new", "placed", "paid", "shipped", "cancelled"},
	Events: []statemachine.EventSpec{
		{Name: "place", Transitions: []statemachine.TransitionSpec{{From: []string{"new"}, To: "placed"}}},
		{Name: "pay", Transitions: []statemachine.TransitionSpec{{From: []string{"placed"}, To: "paid", Guard: "has_total"}}},
		{Name: "ship", Transitions: []statemachine.TransitionSpec{{From: []string{"paid"}, To: "shipped"}}},
		{Name: "cancel", Transitions: []statemachine.TransitionSpec{{From: []string{"placed", "paid"}, To: "cancelled"}}},
	},
}

type order struct {
	ID      string `json:"id"`
	Total   int64  `json:"total"`
	State   string `json:"state"`
	Version int64  `json:"version"`
}

// orders is the write side of the second entity: its table, its machine
// and the one transaction that changes an order.
type orders struct {
	store   *pgstore.Store
	machine *statemachine.Machine[*order]
}

func (o *orders) fire(ctx context.Context, tx *pgstore.Tx, ord *order, event string) error {
	t, err := o.machine.Fire(ord, ord.State, event)
	if err != nil {
		return err
	}
	ord.State = t.To
	ord.Version++
	attrs, _ := json.Marshal(ord)
	return tx.Append(ctx, &envelope.Event{
		ID: uuid.Must(uuid.NewV7()).String(), SchemaVersion: envelope.SchemaVersion,
		EntityType: "order", EntityID: ord.ID, Version: ord.Version,
		Event: t.Event, From: t.From, To: t.To, Attributes: attrs,
		OccurredAt: time.Now(), CorrelationID: "order-test",
	})
}

func (o *orders) place(ctx context.Context, total int64) (string, error) {
	ord := &order{ID: uuid.Must(uuid.NewV7()).String(), Total: total, State: orderMachine.Initial}
	return ord.ID, o.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if err := o.fire(ctx, tx, ord, "place"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO orders (id, total, state, version) VALUES ($1, $2, $3, $4)`, ord.ID, ord.Total, ord.State, ord.Version)
		return err
	})
}

// update is the single place an order changes: lock, load, fire, save.
func (o *orders) update(ctx context.Context, id, event string) error {
	return o.store.InTx(ctx, func(ctx context.Context, tx *pgstore.Tx) error {
		if err := tx.LockEntity(ctx, "order", id); err != nil {
			return err
		}
		ord := &order{ID: id}
		if err := tx.QueryRow(ctx, `SELECT total, state, version FROM orders WHERE id = $1 FOR UPDATE`, id).Scan(&ord.Total, &ord.State, &ord.Version); err != nil {
			return err
		}
		if err := o.fire(ctx, tx, ord, event); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE orders SET state = $2, version = $3 WHERE id = $1`, id, ord.State, ord.Version)
		return err
	})
}

// orderView is the read model: one row per order per generation.
type orderView struct{}

func (orderView) Apply(ctx context.Context, tx pgx.Tx, gen int64, events []envelope.Event) error {
	for _, e := range events {
		if !orderMachine.Allows(e.Event, e.From, e.To) {
			return fmt.Errorf("illegal order transition %s %s→%s", e.Event, e.From, e.To)
		}
		_, err := tx.Exec(ctx, `
			INSERT INTO order_view AS v (generation, id, state, version) VALUES ($1, $2, $3, $4)
			ON CONFLICT (generation, id) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version
			WHERE v.version < EXCLUDED.version`, gen, e.EntityID, e.To, e.Version)
		if err != nil {
			return err
		}
	}
	return nil
}

func (orderView) Clear(ctx context.Context, tx pgx.Tx, gen int64) error {
	_, err := tx.Exec(ctx, `DELETE FROM order_view WHERE generation = $1`, gen)
	return err
}

func TestSecondEntityThroughTheWholeFramework(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.Default()
	}
	dbURL := sandbox.Postgres(t)
	amqpURL, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	worker := sandbox.Name("orders")
	requests := ns + ".order_replay_requests"
	sandbox.DeleteLater(t,
		[]string{topo.UnroutableQueue(), requests, requests + ".dead", worker + ".live", worker + ".replay", worker + ".dead"},
		[]string{topo.EventsExchange, topo.UnroutableExchange(), topo.CommandsExchange, worker + ".dead"})

	pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: dbURL, MaxConns: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if err := pgstore.Migrate(ctx, pool, pgstore.Framework()); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `
		CREATE TABLE orders (id uuid PRIMARY KEY, total bigint NOT NULL, state text NOT NULL, version bigint NOT NULL);
		CREATE TABLE order_view (generation bigint, id uuid, state text NOT NULL, version bigint NOT NULL, PRIMARY KEY (generation, id));`); err != nil {
		t.Fatal(err)
	}
	machine, err := statemachine.NewWithConfig(statemachine.Config[*order]{
		Definition: orderMachine,
		Guards:     map[string]statemachine.Guard[*order]{"has_total": func(o *order) bool { return o.Total > 0 }},
	})
	if err != nil {
		t.Fatal(err)
	}
	wlog := watermill.NewSlogLogger(log)
	store := pgstore.New(pool, wlog)
	o := &orders{store: store, machine: machine}

	// The broker side: shared topology, the relay, the replay responder and
	// a projection worker, all configured with "order" and nothing else.
	conn, err := broker.Connect(amqpURL, wlog)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := broker.WithChannel(conn, func(ch broker.Channel) error { return broker.DeclareShared(ch, topo) }); err != nil {
		t.Fatal(err)
	}
	pub, err := broker.NewPublisher(conn, broker.PublisherConfig{Exchange: topo.EventsExchange}, wlog)
	if err != nil {
		t.Fatal(err)
	}
	relay, err := outbox.NewForwarderRelay(outbox.Config{Pool: pool, Publisher: pub, Topic: pgstore.OutboxTopic, Logger: wlog})
	if err != nil {
		t.Fatal(err)
	}
	responder, err := replay.NewResponder(replay.Config{Pool: pool, AMQPURL: amqpURL, Topology: topo,
		EntityTypes: []string{"order"}, QueueName: requests, Logger: log, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	w, err := projection.NewWorker(projection.Config{Name: worker, EntityTypes: []string{"order"}, Projection: orderView{},
		Pool: pool, AMQPURL: amqpURL, Topology: topo, Schema: "public", Logger: log, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 3)
	for _, run := range []func(context.Context) error{relay.Run, responder.Run, w.Run} {
		go func() { run(ctx); done <- struct{}{} }()
	}
	defer func() {
		cancel()
		for range 3 {
			<-done
		}
	}()
	select {
	case <-w.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("worker not ready")
	}

	// Write: 30 orders through random legal and illegal transitions.
	rng := rand.New(rand.NewPCG(8, 8))
	var ids []string
	for i := 0; i < 30; i++ {
		id, err := o.place(ctx, int64(rng.IntN(3)*100)) // some have no total: pay's guard refuses them
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	refused := 0
	for i := 0; i < 90; i++ {
		err := o.update(ctx, ids[rng.IntN(len(ids))], []string{"pay", "ship", "cancel"}[rng.IntN(3)])
		var te *statemachine.TransitionError
		switch {
		case err == nil:
		case errors.As(err, &te):
			refused++
		default:
			t.Fatal(err)
		}
	}
	if refused == 0 {
		t.Fatal("the machine refused nothing: the test exercises no guard or illegal transition")
	}

	// The projection converges on the write model from live events...
	waitEqual(t, pool, worker)
	// ...and again after a rebuild from a replay routed only to it.
	replayID, err := w.Rebuild(ctx)
	if err != nil {
		t.Fatal(err)
	}
	eventuallyStatus(t, w, func(s projection.Status) bool {
		if s.Rebuild.State == projection.RebuildFailed {
			t.Fatalf("rebuild failed: %s", s.Rebuild.Error)
		}
		return s.Rebuild.ReplayID == replayID && s.Rebuild.State == projection.RebuildCompleted
	})
	var history int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM history WHERE entity_type = 'order'`).Scan(&history); err != nil {
		t.Fatal(err)
	}
	st, err := w.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Rebuild.Received != history || st.ActiveGeneration < 2 {
		t.Fatalf("rebuild received %d of %d order events (generation %d)", st.Rebuild.Received, history, st.ActiveGeneration)
	}
	waitEqual(t, pool, worker)
}

func waitEqual(t *testing.T, pool *pgxpool.Pool, worker string) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		var differ, missing int
		err := pool.QueryRow(context.Background(), `
			SELECT count(*) FILTER (WHERE v.id IS NOT NULL AND (v.state <> o.state OR v.version <> o.version)),
			       count(*) FILTER (WHERE v.id IS NULL)
			FROM orders o LEFT JOIN order_view v ON v.id = o.id AND v.generation = `+projection.ActiveGenerationSQL("public", worker)).Scan(&differ, &missing)
		if err != nil {
			t.Fatal(err)
		}
		if differ == 0 && missing == 0 {
			return
		}
		select {
		case <-deadline:
			t.Fatalf("order view differs from the write model: %d differ, %d missing", differ, missing)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func eventuallyStatus(t *testing.T, w *projection.Worker, cond func(projection.Status) bool) {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		st, err := w.Status(context.Background())
		if err == nil && cond(st) {
			return
		}
		select {
		case <-deadline:
			t.Fatalf("status never satisfied the condition; last %+v (err %v)", st, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
