package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
)

// catalogStatus is the part of GET /catalog/status the bench reads.
type catalogStatus struct {
	Applied            int64              `json:"applied"`
	LagMessages        int64              `json:"lag_messages"`
	Rebuild            projection.Rebuild `json:"rebuild"`
	IllegalTransitions int64              `json:"illegal_transitions"`
}

// waitRebuild polls the catalog until the rebuild with replayID ("" for
// whichever runs or ran last) has completed, and returns the final status.
// A failed rebuild is an error.
func waitRebuild(ctx context.Context, c *http.Client, cat *proc, replayID string, timeout time.Duration) (catalogStatus, error) {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		var st catalogStatus
		if err := call(ctx, c, http.MethodGet, cat.base+"/catalog/status", nil, http.StatusOK, &st); err != nil {
			if aerr := cat.alive(); aerr != nil {
				return st, aerr
			}
			return st, err
		}
		mine := replayID == "" || st.Rebuild.ReplayID == replayID
		switch {
		case mine && st.Rebuild.State == projection.RebuildCompleted:
			return st, nil
		case mine && st.Rebuild.State == projection.RebuildFailed:
			return st, fmt.Errorf("rebuild %s failed: %s", st.Rebuild.ReplayID, st.Rebuild.Error)
		case time.Now().After(deadline):
			return st, fmt.Errorf("rebuild not completed after %s: state %q, %d of %d events", timeout, st.Rebuild.State, st.Rebuild.Received, st.Rebuild.Expected)
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-tick.C:
		}
	}
}

// insertHistory writes a valid history for products new products of
// versions transitions each, straight into the products database: create,
// then add_inventory and reduce_inventory in turn (created → in_stock →
// out_of_stock → in_stock …), attributes in events.ProductAttributes shape,
// unique event ids. Rows go in version-major order, so a replay (by
// sequence) visits the products round robin, as a long-lived system's
// history would, and a batch of the catalog rarely holds one product twice.
func insertHistory(ctx context.Context, pool *pgxpool.Pool, tag string, products, versions int) error {
	_, err := pool.Exec(ctx, `
		INSERT INTO products (id, name, price, inventory, state, version, created_at, updated_at)
		SELECT gen_random_uuid(), $1 || '-' || i, 100,
		       CASE WHEN $2 % 2 = 0 THEN 1 ELSE 0 END,
		       CASE WHEN $2 = 1 THEN 'created' WHEN $2 % 2 = 0 THEN 'in_stock' ELSE 'out_of_stock' END,
		       $2, now() - interval '1 day', now() - interval '1 day' + make_interval(secs => $2)
		FROM generate_series(1, $3::int) i`, tag, versions, products)
	if err != nil {
		return fmt.Errorf("insert products: %w", err)
	}
	// Ten versions per statement: a statement of ~100k rows, each its own
	// transaction, keeps memory and WAL bursts moderate.
	for from := 1; from <= versions; from += 10 {
		to := min(from+9, versions)
		_, err := pool.Exec(ctx, `
			INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
			                     attributes, correlation_id, occurred_at)
			SELECT gen_random_uuid(), $4, p.id, v,
			       CASE WHEN v = 1 THEN 'create' WHEN v % 2 = 0 THEN 'add_inventory' ELSE 'reduce_inventory' END,
			       CASE WHEN v = 1 THEN 'initialized' WHEN v = 2 THEN 'created' WHEN v % 2 = 0 THEN 'out_of_stock' ELSE 'in_stock' END,
			       s.state,
			       jsonb_build_object('id', p.id, 'name', p.name, 'price', p.price,
			                          'inventory', CASE WHEN v % 2 = 0 THEN 1 ELSE 0 END, 'state', s.state),
			       gen_random_uuid()::text,
			       now() - interval '1 day' + make_interval(secs => v)
			FROM generate_series($2::int, $3::int) v
			CROSS JOIN products p
			CROSS JOIN LATERAL (SELECT CASE WHEN v = 1 THEN 'created' WHEN v % 2 = 0 THEN 'in_stock' ELSE 'out_of_stock' END AS state) s
			WHERE p.name LIKE $1 || '-%'
			ORDER BY v, p.id`, tag, from, to, events.EntityType)
		if err != nil {
			return fmt.Errorf("insert history: %w", err)
		}
	}
	return nil
}

// rebuild is S4: full replays of a large history into the catalog's shadow
// model, and the same replay consumed naively for comparison.
//
// The history is written in two parts: first the small one the naive
// consumer replays (a replay sends the whole history, and the naive rate
// makes a million events impractical), then the rest up to the full count
// for the catalog.
func (b *bench) rebuild(ctx context.Context) error {
	b.logf("S4: rebuild from history")
	sys, err := b.e.newSystem(ctx, "s4")
	if err != nil {
		return err
	}
	pool, err := openMigrated(ctx, sys.dbURL, 2)
	if err != nil {
		return fmt.Errorf("S4: %w", err)
	}
	defer pool.Close()
	per := b.plan.EventsPerProduct
	naiveProducts := max(1, b.plan.NaiveEvents/per)
	if err := insertHistory(ctx, pool, "naive", naiveProducts, per); err != nil {
		return fmt.Errorf("S4: %w", err)
	}
	if err := sys.startProducts(ctx); err != nil {
		return err
	}
	if err := b.naive(ctx, sys, int64(naiveProducts*per)); err != nil {
		return fmt.Errorf("S4 naive: %w", err)
	}

	// A new catalog rebuilds from history at its first start: that rebuild,
	// over the naive part of the history, is the warm-up. It starts the
	// processes' paths, declares the queues and creates the read model's
	// tables; a warm-up over the full million would add minutes for little
	// (the history's pages are in the OS cache after the VACUUM below, and
	// each run starts fresh processes anyway).
	if err := sys.startCatalog(ctx); err != nil {
		return err
	}
	st, err := waitRebuild(ctx, b.client, sys.catalog, "", 20*time.Minute)
	if err != nil {
		return fmt.Errorf("S4 warm-up: %w", err)
	}
	b.logf("  S4 warm-up: the catalog's first rebuild applied %d events", st.Rebuild.Received)

	began := time.Now()
	if err := insertHistory(ctx, pool, "s4", (b.plan.RebuildEvents-naiveProducts*per)/per, per); err != nil {
		return fmt.Errorf("S4: %w", err)
	}
	// As autovacuum would have done to an old history: the replays then
	// read an all-visible table with hint bits set, alike in every run.
	if _, err := pool.Exec(ctx, `VACUUM (ANALYZE) history`); err != nil {
		return fmt.Errorf("S4: vacuum history: %w", err)
	}
	var total int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM history`).Scan(&total); err != nil {
		return fmt.Errorf("S4: count history: %w", err)
	}
	b.logf("  S4: %d history events written in %s", total, time.Since(began).Round(time.Millisecond))

	var readyMaxes, readyMeans, batchSizes, batchTimes []float64
	var rates, publishes, rssProducts, rssCatalog, cpuMachine, cpuProducts, cpuCatalog, waitProducts, waitCatalog []float64
	for rep := range b.plan.Reps {
		// Fresh processes, so each VmHWM is this rebuild's peak.
		if err := sys.catalog.stop(); err != nil {
			return err
		}
		if err := sys.products.stop(); err != nil {
			return err
		}
		if err := sys.startProducts(ctx); err != nil {
			return err
		}
		if err := sys.startCatalog(ctx); err != nil {
			return err
		}
		var accepted struct {
			ReplayID string `json:"replay_id"`
		}
		if err := call(ctx, b.client, http.MethodPost, sys.catalog.base+"/catalog/rebuild", nil, http.StatusAccepted, &accepted); err != nil {
			return fmt.Errorf("S4: %w", err)
		}
		start := time.Now()
		mark := markCPU(sys.products, sys.catalog)
		depth := sampleQueue(ctx, b.e.amqpURL, sys.catalogName+".replay", 250*time.Millisecond)
		st, err := waitRebuild(ctx, b.client, sys.catalog, accepted.ReplayID, 20*time.Minute)
		if err != nil {
			depth.finish()
			return fmt.Errorf("S4: %w", err)
		}
		took := time.Since(start)
		cpu := mark.since(sys.products, sys.catalog)
		readyMax, readyMean, err := depth.finish()
		if err != nil {
			return fmt.Errorf("S4: %w", err)
		}
		// The catalog process is fresh: its counters hold this rebuild.
		batchEvents, batchMS, err := replayBatches(ctx, b.client, sys.catalog.base)
		if err != nil {
			return fmt.Errorf("S4: %w", err)
		}
		if st.Rebuild.Received != total {
			return fmt.Errorf("S4: the rebuild applied %d events, the history has %d", st.Rebuild.Received, total)
		}
		// The responder's own timing tells which side bounds the rebuild:
		// publishing the replay, or applying it.
		var rec replay.Record
		if err := call(ctx, b.client, http.MethodGet, sys.products.base+"/api/replays/"+accepted.ReplayID, nil, http.StatusOK, &rec); err != nil {
			return fmt.Errorf("S4: %w", err)
		}
		if rec.StartedAt == nil || rec.FinishedAt == nil || rec.Count != total {
			return fmt.Errorf("S4: replay %s recorded as %s with %d events", accepted.ReplayID, rec.Status, rec.Count)
		}
		publish := float64(rec.Count) / rec.FinishedAt.Sub(*rec.StartedAt).Seconds()
		rp, err := sys.products.peakRSSMiB()
		if err != nil {
			return err
		}
		rc, err := sys.catalog.peakRSSMiB()
		if err != nil {
			return err
		}
		rate := float64(total) / took.Seconds()
		b.logf("  S4 rep %d: %d events in %s: %.0f events/s (the responder published at %.0f/s; replay queue ready max %.0f, mean %.0f; catalog batches of %.0f events, %.1f ms); peak RSS products %.0f MiB, catalog %.0f MiB; CPU: machine %.0f%%, products %.0f%% (waiting for a CPU %.0f%%), catalog %.0f%% (waiting %.0f%%)",
			rep+1, total, took.Round(time.Millisecond), rate, publish, readyMax, readyMean, batchEvents, batchMS, rp, rc, cpu.Machine, cpu.Procs[0], cpu.Waits[0], cpu.Procs[1], cpu.Waits[1])
		rates, rssProducts, rssCatalog = append(rates, rate), append(rssProducts, rp), append(rssCatalog, rc)
		publishes, readyMaxes, readyMeans = append(publishes, publish), append(readyMaxes, readyMax), append(readyMeans, readyMean)
		batchSizes, batchTimes = append(batchSizes, batchEvents), append(batchTimes, batchMS)
		cpuMachine, cpuProducts, cpuCatalog = append(cpuMachine, cpu.Machine), append(cpuProducts, cpu.Procs[0]), append(cpuCatalog, cpu.Procs[1])
		waitProducts, waitCatalog = append(waitProducts, cpu.Waits[0]), append(waitCatalog, cpu.Waits[1])
	}
	if err := sys.catalog.stop(); err != nil {
		return err
	}
	if err := sys.products.stop(); err != nil {
		return err
	}
	b.res.add(
		newFigure("s4_rebuild", "events/s", fmt.Sprintf("POST /catalog/rebuild (202) → state completed, full replay of %d history events into the shadow model", total), rates),
		newFigure("s4_replay_publish", "events/s", "the replay responder's own rate during those rebuilds (its started_at → finished_at): well above s4_rebuild means applying, not publishing, bounds the rebuild", publishes),
		newFigure("s4_replay_queue_ready_max", "messages", "most messages waiting in the catalog's replay queue during a rebuild (sampled every 250 ms): near zero means the consumer waits for the publisher", readyMaxes),
		newFigure("s4_replay_queue_ready_mean", "messages", "the same, mean over the samples", readyMeans),
		newFigure("s4_catalog_batch_events", "events", "mean events per replay batch transaction of the catalog (its maximum is 100)", batchSizes),
		newFigure("s4_catalog_batch_ms", "ms", "mean time to apply and acknowledge one replay batch", batchTimes),
		newFigure("s4_peak_rss_products", "MiB", "VmHWM of the products process (replay responder) over a rebuild, fresh process", rssProducts),
		newFigure("s4_peak_rss_catalog", "MiB", "VmHWM of the catalog process over a rebuild, fresh process", rssCatalog),
		newFigure("s4_cpu_machine", "%", "share of all CPUs busy during a rebuild", cpuMachine),
		newFigure("s4_cpu_products", "% of a CPU", "CPU used by the products process (the replay responder) during a rebuild", cpuProducts),
		newFigure("s4_cpu_catalog", "% of a CPU", "CPU used by the catalog process during a rebuild", cpuCatalog),
		newFigure("s4_cpu_wait_products", "% of wall time", "time the products process's threads were ready to run but waited for a CPU during a rebuild", waitProducts),
		newFigure("s4_cpu_wait_catalog", "% of wall time", "the same for the catalog process", waitCatalog),
	)
	return nil
}

// naive consumes a replay the way a naive projector does: prefetch 1, one
// PostgreSQL transaction per event (a catalog-shaped upsert with the
// version check), one ack per event. It measures from the 202 of
// POST /api/replays until the last event is committed and acked.
func (b *bench) naive(ctx context.Context, sys *system, count int64) error {
	b.logf("  S4 naive: one transaction and one ack per event, prefetch 1, %d events", count)
	db, err := b.e.createDB(ctx, "naive")
	if err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, db)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, `
		CREATE TABLE products (
			id         uuid PRIMARY KEY,
			name       text        NOT NULL,
			price      bigint      NOT NULL,
			inventory  bigint      NOT NULL,
			state      text        NOT NULL,
			version    bigint      NOT NULL,
			updated_at timestamptz NOT NULL
		)`); err != nil {
		return fmt.Errorf("create table: %w", err)
	}
	prefix := b.e.name("naive")
	queue := prefix + ".replay"
	b.e.deleteLater([]string{queue}, nil)
	amqpConn, err := amqp091.DialConfig(b.e.amqpURL, amqp091.Config{
		Dial:       amqp091.DefaultDial(5 * time.Second),
		Properties: amqp091.Table{"connection_name": "statemill bench naive consumer"},
	})
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer amqpConn.Close()
	ch, err := amqpConn.Channel()
	if err != nil {
		return fmt.Errorf("channel: %w", err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp091.Table{"x-queue-type": "classic"}); err != nil {
		return fmt.Errorf("declare %s: %w", queue, err)
	}
	// Bound before the replay is requested: RabbitMQ drops what no queue
	// is bound for.
	if err := ch.QueueBind(queue, envelope.ReplayBinding(prefix, events.EntityType), sys.topology.EventsExchange, false, nil); err != nil {
		return fmt.Errorf("bind %s: %w", queue, err)
	}
	n := naiveConsumer{b: b, sys: sys, db: conn, amqp: amqpConn, queue: queue, prefix: prefix}
	if _, err := n.run(ctx, int64(b.plan.NaiveWarmup)); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	var rates []float64
	for rep := range b.plan.Reps {
		rate, err := n.run(ctx, 0)
		if err != nil {
			return err
		}
		b.logf("  S4 naive rep %d: %d events at %.0f events/s", rep+1, count, rate)
		rates = append(rates, rate)
	}
	b.res.add(newFigure("s4_naive_rebuild", "events/s",
		fmt.Sprintf("the same replay (%d events) into a catalog-shaped table, prefetch 1, one transaction and one ack per event", count), rates))
	return nil
}

type naiveConsumer struct {
	b      *bench
	sys    *system
	db     *pgx.Conn
	amqp   *amqp091.Connection
	queue  string
	prefix string
}

// run requests a replay and applies it; with limit > 0 it stops after
// limit events (a warm-up), waits for the replay to finish and discards
// the rest. It returns the events applied per second.
func (n naiveConsumer) run(ctx context.Context, limit int64) (float64, error) {
	if _, err := n.db.Exec(ctx, `TRUNCATE products`); err != nil {
		return 0, fmt.Errorf("truncate: %w", err)
	}
	ch, err := n.amqp.Channel()
	if err != nil {
		return 0, fmt.Errorf("channel: %w", err)
	}
	// Closing the channel hands back what was delivered and not acked.
	defer ch.Close()
	if _, err := ch.QueuePurge(n.queue, false); err != nil {
		return 0, fmt.Errorf("purge: %w", err)
	}
	if err := ch.Qos(1, 0, false); err != nil {
		return 0, fmt.Errorf("qos: %w", err)
	}
	deliveries, err := ch.Consume(n.queue, "", false, false, false, false, nil)
	if err != nil {
		return 0, fmt.Errorf("consume: %w", err)
	}
	body, _ := json.Marshal(replay.Request{Prefix: n.prefix, EntityType: events.EntityType, Mode: replay.Full})
	var accepted struct {
		ReplayID string `json:"replay_id"`
	}
	base := n.sys.products.base
	if err := call(ctx, n.b.client, http.MethodPost, base+"/api/replays", body, http.StatusAccepted, &accepted); err != nil {
		return 0, err
	}
	start := time.Now()
	var applied int64
	count := int64(math.MaxInt64) // known from the completed marker
	completed := "." + replay.CompletedEvent
	for applied < count && (limit == 0 || applied < limit) {
		var d amqp091.Delivery
		var ok bool
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case d, ok = <-deliveries:
			if !ok {
				return 0, errors.New("the consumer's channel closed")
			}
		case <-time.After(time.Minute):
			return 0, fmt.Errorf("no delivery for a minute (%d events applied)", applied)
		}
		if id, _ := d.Headers[envelope.HeaderReplayID].(string); id != accepted.ReplayID {
			// Left over from an earlier replay.
			if err := d.Ack(false); err != nil {
				return 0, fmt.Errorf("ack: %w", err)
			}
			continue
		}
		switch {
		case strings.HasSuffix(d.RoutingKey, completed):
			var c replay.Completed
			if err := json.Unmarshal(d.Body, &c); err != nil {
				return 0, fmt.Errorf("decode %s: %w", d.RoutingKey, err)
			}
			count = c.Count
		case strings.HasSuffix(d.RoutingKey, "."+replay.StartedEvent):
		default:
			if err := n.apply(ctx, d.Body); err != nil {
				return 0, err
			}
			applied++
		}
		if err := d.Ack(false); err != nil {
			return 0, fmt.Errorf("ack: %w", err)
		}
	}
	rate := float64(applied) / time.Since(start).Seconds()
	if limit > 0 {
		if err := n.waitReplayDone(ctx, accepted.ReplayID); err != nil {
			return 0, err
		}
		if _, err := ch.QueuePurge(n.queue, false); err != nil {
			return 0, fmt.Errorf("purge: %w", err)
		}
	}
	return rate, nil
}

// apply upserts one event in a transaction of its own.
func (n naiveConsumer) apply(ctx context.Context, body []byte) error {
	e, err := envelope.Decode(body)
	if err != nil {
		return err
	}
	var a events.ProductAttributes
	if err := json.Unmarshal(e.Attributes, &a); err != nil {
		return fmt.Errorf("attributes of %s: %w", e.ID, err)
	}
	return pgx.BeginFunc(ctx, n.db, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `
			INSERT INTO products AS p (id, name, price, inventory, state, version, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7)
			ON CONFLICT (id) DO UPDATE SET
				name = EXCLUDED.name, price = EXCLUDED.price, inventory = EXCLUDED.inventory,
				state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
			WHERE p.version < EXCLUDED.version`,
			e.EntityID, a.Name, a.Price, a.Inventory, a.State, e.Version, e.OccurredAt)
		if err != nil {
			return fmt.Errorf("upsert %s: %w", e.ID, err)
		}
		return nil
	})
}

func (n naiveConsumer) waitReplayDone(ctx context.Context, id string) error {
	deadline := time.Now().Add(5 * time.Minute)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var rec struct {
			Status string `json:"status"`
		}
		if err := call(ctx, n.b.client, http.MethodGet, n.sys.products.base+"/api/replays/"+id, nil, http.StatusOK, &rec); err != nil {
			return err
		}
		switch replay.Status(rec.Status) {
		case replay.StatusDone:
			return nil
		case replay.StatusFailed:
			return fmt.Errorf("replay %s failed", id)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replay %s not done after 5m: %s", id, rec.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// queueSampler reads a queue's ready messages at a fixed interval.
type queueSampler struct {
	stop    chan struct{}
	done    chan struct{}
	samples []float64
	err     error
}

// sampleQueue samples queue on a connection of its own until finish.
func sampleQueue(ctx context.Context, amqpURL, queue string, every time.Duration) *queueSampler {
	s := &queueSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		conn, err := amqp091.Dial(amqpURL)
		if err != nil {
			s.err = fmt.Errorf("sample %s: %w", queue, err)
			return
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			s.err = fmt.Errorf("sample %s: %w", queue, err)
			return
		}
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
			if err != nil {
				s.err = fmt.Errorf("sample %s: %w", queue, err)
				return
			}
			s.samples = append(s.samples, float64(q.Messages))
			select {
			case <-ctx.Done():
				return
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// finish stops sampling and returns the largest and the mean sample.
func (s *queueSampler) finish() (peak, mean float64, err error) {
	close(s.stop)
	<-s.done
	if s.err != nil {
		return 0, 0, s.err
	}
	if len(s.samples) == 0 {
		return 0, 0, errors.New("no queue sample")
	}
	var sum float64
	for _, v := range s.samples {
		peak, sum = max(peak, v), sum+v
	}
	return peak, sum / float64(len(s.samples)), nil
}

// replayBatches reads, from the catalog's /metrics, the mean size and
// duration of its replay batches so far.
func replayBatches(ctx context.Context, c *http.Client, base string) (events, ms float64, err error) {
	text, err := metricsText(ctx, c, base)
	if err != nil {
		return 0, 0, err
	}
	const replayQueue = `queue="replay"`
	applied := metricSum(text, "statemill_projection_events_applied_total", replayQueue)
	count := metricSum(text, "statemill_projection_batch_duration_seconds_count", replayQueue)
	sum := metricSum(text, "statemill_projection_batch_duration_seconds_sum", replayQueue)
	if count == 0 {
		return 0, 0, errors.New("catalog metrics: no replay batch recorded")
	}
	return applied / count, 1000 * sum / count, nil
}
