package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// scenario is one fault injected while the load runs.
type scenario struct {
	number int
	name   string
	desc   string
	// gates are shares of the commands: the load does not send past the
	// k-th gate before the fault's k-th step has begun. Injecting a fault
	// can take seconds (a broker restart) while commands, which do not
	// wait for the broker, race ahead: a gate keeps some of them for after
	// the step began, so that every fault happens mid-load.
	gates []float64
	// fault runs beside the load. It waits for the load's progress to
	// place its faults mid-load, and returns once every part it broke is
	// back (it may outlast the load).
	fault func(ctx context.Context, e *env, l *load, f *faultReport) error
}

func scenarios() []scenario {
	return []scenario{
		{1, "products-sigkill", "SIGKILL of the products service mid-load, then a restart", []float64{0.9}, killProducts},
		{2, "catalog-sigkill", "SIGKILL of the catalog mid-load, then a restart", []float64{0.9}, killCatalog},
		{3, "broker-restarts", "RabbitMQ restarted twice mid-load: stop_app/start_app, then kill -9 of the node and a start", []float64{0.5, 0.9}, restartBroker},
		{4, "postgres-restarts", "PostgreSQL restarted mid-load: a fast shutdown, later a kill -9 of the postmaster; commands answer 503 while it is down", []float64{0.5, 0.9}, restartPostgres},
		{5, "long-transaction", "a transaction holding an xid on the products database stays open during the load; the outbox waits, then catches up", []float64{0.9}, holdTransaction},
		{6, "poison-messages", "undecodable and unprocessable messages published to the live queues during the load: dead-lettered, the stream goes on", []float64{0.45, 0.65, 0.9}, injectPoison},
		{7, "rebuild-under-load", "a catalog rebuild requested during the load", []float64{0.9}, rebuildUnderLoad},
	}
}

// faultEvent is one step of a scenario's fault, timed from the load's start.
type faultEvent struct {
	At       float64 `json:"at_seconds"`
	Progress float64 `json:"load_progress"` // share of the commands sent by then
	What     string  `json:"what"`
	Took     float64 `json:"took_seconds,omitempty"`
}

// faultReport is what a scenario measured about its fault.
type faultReport struct {
	Timeline            []faultEvent   `json:"timeline"`
	Count503            int64          `json:"count_503,omitempty"`
	Max503Millis        float64        `json:"max_503_ms,omitempty"`
	AckedWhileDown      *int64         `json:"acknowledged_while_down,omitempty"`
	AckedAfterRecovery  *int64         `json:"acknowledged_after_recovery,omitempty"`
	HoldSeconds         float64        `json:"hold_seconds,omitempty"`
	HeldXID             string         `json:"held_xid,omitempty"`
	OutboxPendingMax    int64          `json:"outbox_pending_max,omitempty"`
	PublishedDuringHold *int64         `json:"published_during_hold,omitempty"`
	PoisonInjected      int64          `json:"poison_injected,omitempty"`
	AppliedAfterPoison  *int64         `json:"applied_after_poison,omitempty"`
	Rebuild             *rebuildReport `json:"rebuild,omitempty"`
	FirstCommand        *firstCommand  `json:"first_command_after_restart,omitempty"`
	Problems            []string       `json:"problems,omitempty"`

	mu sync.Mutex
}

type rebuildReport struct {
	State          string  `json:"state"`
	Expected       int64   `json:"expected"`
	Received       int64   `json:"received"`
	Seconds        float64 `json:"seconds"`
	DuringLoad     bool    `json:"completed_during_load"`
	Error          string  `json:"error,omitempty"`
	ReplayID       string  `json:"replay_id,omitempty"`
	RequestedAtPct float64 `json:"requested_at_load_progress"`
}

// note adds a step to the timeline; a fault that begins after the load
// ended is a problem of the scenario (it would not test what it says).
func (f *faultReport) note(l *load, what string, took time.Duration, begins bool) {
	progress := float64(l.started.Load()) / float64(max(1, l.cfg.commands))
	f.mu.Lock()
	defer f.mu.Unlock()
	ev := faultEvent{At: round(l.since()), Progress: round(progress), What: what}
	if took > 0 {
		ev.Took = round(took.Seconds())
	}
	f.Timeline = append(f.Timeline, ev)
	if begins {
		select {
		case <-l.finished:
			f.Problems = append(f.Problems, fmt.Sprintf("%q began after the load had ended", what))
		default:
		}
		l.faultBegan()
	}
}

func (f *faultReport) problem(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Problems = append(f.Problems, fmt.Sprintf(format, args...))
}

func killProducts(ctx context.Context, e *env, l *load, f *faultReport) error {
	return killService(ctx, e.products, l, f)
}

func killCatalog(ctx context.Context, e *env, l *load, f *faultReport) error {
	return killService(ctx, e.catalog, l, f)
}

func killService(ctx context.Context, svc *service, l *load, f *faultReport) error {
	if err := l.reached(ctx, 0.4); err != nil {
		return err
	}
	f.note(l, "SIGKILL "+svc.name, 0, true)
	t := time.Now()
	if err := svc.kill(); err != nil {
		return err
	}
	var probed chan firstCommand
	if svc.name == "products" {
		// Clients that retry reach the new process as soon as it listens,
		// before any health check says it is ready.
		probed = make(chan firstCommand, 1)
		go func() { probed <- probeFirstCommand(ctx, svc.base) }()
	}
	if err := svc.start(ctx); err != nil {
		return err
	}
	f.note(l, svc.name+" restarted and healthy", time.Since(t), false)
	if probed != nil {
		p := <-probed
		f.FirstCommand = &p
		if p.Error != "" || (p.Status != http.StatusNotFound && p.Status != http.StatusServiceUnavailable) ||
			p.Millis > float64(hungAfter/time.Millisecond) {
			f.problem("the first command sent once the restarted products service listened was answered %d after %.0f ms (%s), want a quick 404 or 503",
				p.Status, p.Millis, p.Error)
		}
	}
	return nil
}

// firstCommand is how the restarted products service answered a command
// sent the moment its port accepted connections.
type firstCommand struct {
	Status int     `json:"status"`
	Millis float64 `json:"ms"`
	Error  string  `json:"error,omitempty"`
}

// probeFirstCommand waits for the port to accept connections and sends at
// once a command that goes through the command bus and writes nothing: an
// adjustment of a product that does not exist (404).
func probeFirstCommand(ctx context.Context, base string) firstCommand {
	addr := strings.TrimPrefix(base, "http://")
	if err := poll(ctx, time.Minute, "the port", func() bool {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			return false
		}
		_ = c.Close()
		return true
	}); err != nil {
		return firstCommand{Error: err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, base+"/api/products/"+uuid.NewString(), strings.NewReader(`{"adjust_inventory":1}`))
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	res, err := http.DefaultClient.Do(req)
	p := firstCommand{Millis: round(float64(time.Since(start)) / float64(time.Millisecond))}
	if err != nil {
		p.Error = err.Error()
		return p
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	p.Status = res.StatusCode
	return p
}

func restartBroker(ctx context.Context, e *env, l *load, f *faultReport) error {
	mq := e.s.mq
	if err := l.reached(ctx, 0.25); err != nil {
		return err
	}
	f.note(l, "rabbitmqctl stop_app", 0, true)
	t := time.Now()
	if err := mq.stopApp(ctx); err != nil {
		return err
	}
	f.note(l, "stopped", time.Since(t), false)
	if !wait(ctx, e.s.p.brokerDown) {
		return ctx.Err()
	}
	t = time.Now()
	if err := mq.startApp(ctx); err != nil {
		return err
	}
	f.note(l, "rabbitmqctl start_app, accepting connections", time.Since(t), false)

	if err := l.reached(ctx, 0.6); err != nil {
		return err
	}
	f.note(l, "kill -9 of the node's beam.smp", 0, true)
	t = time.Now()
	if err := mq.kill(ctx); err != nil {
		return err
	}
	if !wait(ctx, e.s.p.brokerDown) {
		return ctx.Err()
	}
	t = time.Now()
	if err := mq.start(ctx); err != nil {
		return err
	}
	f.note(l, "rabbitmq-server started again, accepting connections", time.Since(t), false)
	return nil
}

func restartPostgres(ctx context.Context, e *env, l *load, f *faultReport) error {
	pg := e.s.pg
	var whileDown int64
	down := func(stop func(context.Context) error, what string) error {
		f.note(l, what, 0, true)
		t := time.Now()
		if err := stop(ctx); err != nil {
			return err
		}
		f.note(l, "postgres down", time.Since(t), false)
		before := l.acked.Load()
		if !wait(ctx, e.s.p.pgDown) {
			return ctx.Err()
		}
		whileDown += l.acked.Load() - before
		t = time.Now()
		if err := pg.start(ctx); err != nil {
			return err
		}
		f.note(l, "postgres started again", time.Since(t), false)
		return nil
	}
	if err := l.reached(ctx, 0.3); err != nil {
		return err
	}
	if err := down(pg.stop, "pg_ctl stop -m fast"); err != nil {
		return err
	}
	if err := l.reached(ctx, 0.65); err != nil {
		return err
	}
	if err := down(pg.kill, "kill -9 of the postmaster"); err != nil {
		return err
	}
	recovered := l.acked.Load()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-l.finished:
	}
	after := l.acked.Load() - recovered
	f.AckedAfterRecovery, f.AckedWhileDown = &after, &whileDown
	f.Count503 = l.count503.Load()
	f.Max503Millis = round(float64(l.max503.Load()) / float64(time.Millisecond))
	switch {
	case f.Count503 == 0:
		f.problem("no command was answered 503 while PostgreSQL was down")
	case f.Max503Millis > 2000:
		f.problem("a 503 took %.0f ms: not quick", f.Max503Millis)
	}
	if after == 0 {
		f.problem("no command was acknowledged after PostgreSQL came back")
	}
	return nil
}

func holdTransaction(ctx context.Context, e *env, l *load, f *faultReport) error {
	if err := l.reached(ctx, 0.3); err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, e.s.pg.url(e.dbs["products"]))
	if err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after the commit
	// The write takes an xid: every transaction that commits after this one
	// began has a higher xid and must wait in the outbox until it ends.
	if err := tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text`).Scan(&f.HeldXID); err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	f.note(l, "transaction "+f.HeldXID+" opened on the products database", 0, true)
	if _, err := tx.Exec(ctx, `INSERT INTO faults_hold DEFAULT VALUES`); err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	auditBefore := queueDepth(e.amqpURL, auditQueue)
	start := time.Now()
	timer := time.NewTimer(e.s.p.hold)
	defer timer.Stop()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
hold:
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			break hold
		case <-tick.C:
			f.OutboxPendingMax = max(f.OutboxPendingMax, outboxPending(ctx, e.products.base))
		}
	}
	published := queueDepth(e.amqpURL, auditQueue) - auditBefore
	f.PublishedDuringHold = &published
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("hold: commit: %w", err)
	}
	f.HoldSeconds = round(time.Since(start).Seconds())
	f.note(l, "transaction "+f.HeldXID+" committed", time.Since(start), false)
	return nil
}

// poisonRound publishes one message of each kind of poison, each with a
// routing key the catalog's live queue is bound to.
func poisonRound(e *env, round int) (int64, error) {
	event := func(mut func(map[string]any)) []byte {
		m := map[string]any{
			"id": uuid.NewString(), "schema_version": 1, "sequence": 1, "entity_type": "product",
			"entity_id": uuid.NewString(), "version": 1, "event": "create", "from": "initialized", "to": "created",
			"entity_attributes": map[string]any{"name": "poison", "price": 1, "inventory": 0, "state": "created"},
			"occurred_at":       time.Now().UTC().Format(time.RFC3339Nano), "correlation_id": "poison",
		}
		mut(m)
		b, _ := json.Marshal(m)
		return b
	}
	kinds := []struct {
		key     string
		body    []byte
		headers amqp091.Table
	}{
		{"product.create", []byte{0xff, 0xfe, 0x00, 0x01, 0x80}, nil}, // not JSON
		{"product.add_inventory", []byte(`{"id":"`), nil},             // truncated
		{"product.reduce_inventory", nil, nil},                        // empty
		{"product.discontinue", []byte(`{"not":"an event"}`), amqp091.Table{"x-weird": int32(7), "nested": amqp091.Table{"a": "b"}, "flag": true}}, // no event, odd headers
		{"product.create", event(func(m map[string]any) { m["schema_version"] = 99 }), nil},                                                        // unsupported schema
		{"product.create", event(func(m map[string]any) { m["entity_id"] = "not-a-uuid" }), nil},                                                   // decodes, cannot be stored
		{"product.add_inventory", event(func(m map[string]any) { m["entity_attributes"] = "oops" }), nil},                                          // decodes, attributes unusable
		{"product.replay_completed", []byte(`{"replay_id":"` + uuid.NewString() + `","count":1}`), nil},                                            // a marker on the live path
		{"product.create", event(func(m map[string]any) { m["version"] = 0 }), amqp091.Table{"x-death": []any{amqp091.Table{"count": int64(3)}}}},  // version 0
	}
	var n int64
	err := e.withChannel(func(ch *amqp091.Channel) error {
		if err := ch.Confirm(false); err != nil {
			return err
		}
		for i, k := range kinds {
			dc, err := ch.PublishWithDeferredConfirm("events", k.key, true, false, amqp091.Publishing{
				ContentType: "application/json", DeliveryMode: amqp091.Persistent,
				MessageId: fmt.Sprintf("%s%d-%d", poisonPrefix, round, i), Body: k.body, Headers: k.headers,
			})
			if err != nil {
				return err
			}
			ok, err := dc.WaitContext(context.Background())
			if err != nil || !ok {
				return errors.Join(errors.New("poison not confirmed"), err)
			}
			n++
		}
		return nil
	})
	return n, err
}

func injectPoison(ctx context.Context, e *env, l *load, f *faultReport) error {
	for round, frac := range []float64{0.3, 0.5, 0.7} {
		if err := l.reached(ctx, frac); err != nil {
			return err
		}
		f.note(l, "poison published to events", 0, true)
		n, err := poisonRound(e, round)
		f.PoisonInjected += n
		if err != nil {
			return fmt.Errorf("poison: %w", err)
		}
	}
	st, err := getStatus(ctx, e.catalog.base)
	if err != nil {
		return err
	}
	// The stream goes on: events published after the poison get applied.
	err = poll(ctx, e.s.p.settle, "events applied after the poison", func() bool {
		now, err := getStatus(ctx, e.catalog.base)
		if err != nil || now.Applied <= st.Applied {
			return false
		}
		d := now.Applied - st.Applied
		f.AppliedAfterPoison = &d
		return true
	})
	if err != nil {
		f.problem("nothing was applied after the poison: %v", err)
	}
	return nil
}

func rebuildUnderLoad(ctx context.Context, e *env, l *load, f *faultReport) error {
	if err := l.reached(ctx, 0.3); err != nil {
		return err
	}
	rb := &rebuildReport{RequestedAtPct: round(float64(l.started.Load()) / float64(l.cfg.commands))}
	f.Rebuild = rb
	f.note(l, "POST /catalog/rebuild", 0, true)
	start := time.Now()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.catalog.base+"/catalog/rebuild", nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("rebuild: %w", err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusAccepted {
		return fmt.Errorf("POST /catalog/rebuild: %d %s", res.StatusCode, body)
	}
	var accepted struct {
		ReplayID string `json:"replay_id"`
	}
	_ = json.Unmarshal(body, &accepted)
	rb.ReplayID = accepted.ReplayID
	var st catalogStatus
	err = poll(ctx, e.s.p.settle, "the rebuild to finish", func() bool {
		st, err = getStatus(ctx, e.catalog.base)
		return err == nil && st.Rebuild.ReplayID == rb.ReplayID && (st.Rebuild.State == "completed" || st.Rebuild.State == "failed")
	})
	rb.Seconds = round(time.Since(start).Seconds())
	rb.State, rb.Expected, rb.Received, rb.Error = st.Rebuild.State, st.Rebuild.Expected, st.Rebuild.Received, st.Rebuild.Error
	select {
	case <-l.finished:
	default:
		rb.DuringLoad = true
	}
	if err != nil {
		f.problem("%v", err)
		return nil
	}
	f.note(l, "rebuild "+st.Rebuild.State, time.Since(start), false)
	if st.Rebuild.State != "completed" {
		f.problem("the rebuild ended %s: %s", st.Rebuild.State, st.Rebuild.Error)
	}
	return nil
}

func round(x float64) float64 {
	return float64(int64(x*1000+0.5)) / 1000
}
