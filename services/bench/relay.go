package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// relayDrain is S2: how fast the relay empties a backlog into the broker.
//
// The relay runs inside the products process and has no switch, so the
// backlog is written while the process is stopped: outbox rows in exactly
// the shape pgstore.Tx.Append writes (see outboxRow). Then the process
// starts and the bench watches a queue bound to every live event: the
// drain rate is the messages that arrived between the first poll that saw
// any and the one that saw them all, over that time. Watching the broker
// rather than the relay's count measures delivery itself, costs the
// database nothing, and does not depend on how a relay keeps its offsets.
func (b *bench) relayDrain(ctx context.Context) error {
	b.logf("S2: relay drain of an outbox backlog")
	sys, err := b.e.newSystem(ctx, "s2")
	if err != nil {
		return err
	}
	sink := b.e.name("s2-sink")
	b.e.deleteLater([]string{sink}, nil)
	// A first start migrates the database and declares the exchanges.
	if err := sys.startProducts(ctx); err != nil {
		return err
	}
	if err := sys.products.stop(); err != nil {
		return err
	}
	pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: sys.dbURL, MaxConns: 2})
	if err != nil {
		return fmt.Errorf("S2: %w", err)
	}
	defer pool.Close()
	conn, err := amqp091.Dial(b.e.amqpURL)
	if err != nil {
		return fmt.Errorf("S2: connect: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("S2: channel: %w", err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(sink, true, false, false, false, amqp091.Table{"x-queue-type": "classic"}); err != nil {
		return fmt.Errorf("S2: declare %s: %w", sink, err)
	}
	if err := ch.QueueBind(sink, envelope.LiveBinding(events.EntityType), sys.topology.EventsExchange, false, nil); err != nil {
		return fmt.Errorf("S2: bind %s: %w", sink, err)
	}

	if _, _, err := b.drainOnce(ctx, sys, pool, ch, sink, b.plan.S2Warmup); err != nil {
		return fmt.Errorf("S2 warm-up: %w", err)
	}
	var rates, cpuMachine, cpuProducts []float64
	for rep := range b.plan.Reps {
		r, cpu, err := b.drainOnce(ctx, sys, pool, ch, sink, b.plan.S2Backlog)
		if err != nil {
			return fmt.Errorf("S2: %w", err)
		}
		b.logf("  S2 rep %d: %d events drained at %.0f events/s; CPU: machine %.0f%%, products %.0f%% (waiting for a CPU %.0f%%)",
			rep+1, b.plan.S2Backlog, r, cpu.Machine, cpu.Procs[0], cpu.Waits[0])
		rates, cpuMachine, cpuProducts = append(rates, r), append(cpuMachine, cpu.Machine), append(cpuProducts, cpu.Procs[0])
	}
	b.res.add(
		newFigure("s2_relay_drain", "events/s", fmt.Sprintf("the products service's relay draining a %d-event outbox backlog to the broker", b.plan.S2Backlog), rates),
		newFigure("s2_cpu_machine", "%", "share of all CPUs busy during a drain (from the process start until every event arrived)", cpuMachine),
		newFigure("s2_cpu_products", "% of a CPU", "CPU used by the products process (its relay) during a drain", cpuProducts),
	)
	return nil
}

// drainOnce writes a backlog of n rows, starts the products process, and
// measures the drain. It stops the process again once the relay reports an
// empty outbox.
func (b *bench) drainOnce(ctx context.Context, sys *system, pool *pgxpool.Pool, ch *amqp091.Channel, sink string, n int) (float64, cpuUse, error) {
	if err := writeBacklog(ctx, pool, n, 100); err != nil {
		return 0, cpuUse{}, err
	}
	if _, err := ch.QueuePurge(sink, false); err != nil {
		return 0, cpuUse{}, fmt.Errorf("purge %s: %w", sink, err)
	}
	// Watching starts before the process does, so the first arrivals are
	// seen within one poll.
	watchCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	watched := make(chan watchResult, 1)
	go func() { watched <- watchQueue(watchCtx, ch, sink, n, 10*time.Minute) }()
	began := time.Now()
	mark := markCPU()
	if err := sys.startProducts(ctx); err != nil {
		return 0, cpuUse{}, err
	}
	// The process's CPU time counts from its start: its mark is zero.
	mark.procs, mark.waits = []uint64{0}, []uint64{0}
	w := <-watched
	if w.err != nil {
		return 0, cpuUse{}, w.err
	}
	cpu := mark.since(sys.products)
	if _, err := waitOutboxDrained(ctx, b.client, sys.products.base, time.Minute); err != nil {
		return 0, cpuUse{}, err
	}
	if err := sys.products.stop(); err != nil {
		return 0, cpuUse{}, err
	}
	if _, err := ch.QueuePurge(sink, false); err != nil {
		return 0, cpuUse{}, fmt.Errorf("purge %s: %w", sink, err)
	}
	arrived := min(w.last.msgs, n) - w.first.msgs
	if span := w.last.at.Sub(w.first.at); arrived > 0 && span > 0 {
		return float64(arrived) / span.Seconds(), cpu, nil
	}
	// All of it arrived between two polls (a tiny backlog): count from the
	// process start, which overstates the time.
	return float64(n) / w.last.at.Sub(began).Seconds(), cpu, nil
}

type queueSample struct {
	at   time.Time
	msgs int
}

type watchResult struct {
	first, last queueSample // the first poll that saw messages, the first that saw n
	err         error
}

// watchQueue polls the depth of queue every 10 ms until it holds n messages.
func watchQueue(ctx context.Context, ch *amqp091.Channel, queue string, n int, timeout time.Duration) watchResult {
	var r watchResult
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
		if err != nil {
			r.err = fmt.Errorf("depth of %s: %w", queue, err)
			return r
		}
		s := queueSample{time.Now(), q.Messages}
		if r.first.at.IsZero() && s.msgs > 0 {
			r.first = s
		}
		if s.msgs >= n {
			r.last = s
			return r
		}
		if s.at.After(deadline) {
			r.err = fmt.Errorf("%s holds %d of %d messages after %s", queue, s.msgs, n, timeout)
			return r
		}
		select {
		case <-ctx.Done():
			r.err = ctx.Err()
			return r
		case <-tick.C:
		}
	}
}
