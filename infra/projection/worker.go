package projection

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// Worker runs one projection: it consumes N.live (and N.replay while a
// rebuild or catch-up of this process runs), applies events in batched
// read-model transactions, and rebuilds the read model on request.
//
// It consumes through broker.Conn (amqp091-go, or the in-process broker of
// the embedded mode) rather than Watermill's AMQP subscriber (DESIGN §10):
// that subscriber hands over one message at a time
// and waits for its ack, so every event would cost a read-model transaction
// of its own. The rebuild goal of ≥10k events/s (baselines §7.5) needs
// batches of up to BatchSize events per transaction (ReplayBatchSize for
// replays) and one ack per batch, fed by a prefetch well above the batch
// size.
//
// One process per worker name is the normal deployment. Several processes
// with the same name share N.live as competing consumers and are safe; the
// rebuild lock lets only one of them rebuild at a time, and only the process
// that runs a rebuild consumes N.replay.
type Worker struct {
	cfg   Config
	log   *slog.Logger
	store *store
	m     *metrics

	ready     chan struct{}
	readyOnce sync.Once

	mu          sync.Mutex
	running     bool            // Run is running
	runCtx      context.Context // Run's ctx, for rebuilds started while it runs
	conn        broker.Conn     // current broker connection; nil while disconnected
	cur         *run            // the rebuild or catch-up this process runs
	starting    bool            // a Rebuild or CatchUp call is between its checks and its start
	lastCatchUp *Rebuild        // the last finished catch-up of this process
	runChanged  chan struct{}   // closed (and replaced) when cur changes
	autoStarted bool            // this Run's first session has decided on an automatic rebuild or catch-up
	supervisors sync.WaitGroup

	deadLettered atomic.Int64
	retries      atomic.Int64
	reconnects   atomic.Int64
	staleDropped atomic.Int64
	pendingSince atomic.Int64 // unix nanos: occurred_at of the oldest live event being applied; 0 when none
}

// NewWorker validates c, fills in its defaults and registers the metrics.
func NewWorker(c Config) (*Worker, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	m, err := newMetrics(c.Registerer, c.Name)
	if err != nil {
		return nil, fmt.Errorf("projection: metrics: %w", err)
	}
	return &Worker{
		cfg:        c,
		log:        c.Logger.With("projection", c.Name),
		store:      newStore(c),
		m:          m,
		ready:      make(chan struct{}),
		runChanged: make(chan struct{}),
	}, nil
}

// Queue names of the worker.
func (w *Worker) liveQueue() string   { return w.cfg.Name + ".live" }
func (w *Worker) replayQueue() string { return w.cfg.Name + ".replay" }
func (w *Worker) deadQueue() string   { return w.cfg.Name + ".dead" }

// Ready is closed once the worker consumes N.live for the first time (its
// queues are declared and bound).
func (w *Worker) Ready() <-chan struct{} { return w.ready }

// Run creates the runtime tables and state row if needed, then consumes
// until ctx is done, reconnecting to the broker with backoff whenever the
// connection is lost (unacked deliveries are redelivered by the broker, and
// applying them again changes nothing). When ctx is done it finishes the
// batch in flight, gives up a rebuild or catch-up it runs (the live model is
// kept) and returns nil. It returns an error only for a failure that
// retrying cannot fix (such as a missing privilege).
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("projection: Run is already running")
	}
	w.running, w.runCtx, w.autoStarted = true, ctx, false
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.running = false // no run starts from now on
		w.mu.Unlock()
		w.supervisors.Wait()
	}()

	var created bool
	err := retry(ctx, w, "prepare the runtime tables", nil, func(ctx context.Context) error {
		var err error
		created, err = w.store.ensure(ctx)
		if err == nil {
			err = w.recoverInterrupted(ctx)
		}
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}

	b := backoff{min: 200 * time.Millisecond, max: 5 * time.Second}
	connectedBefore := false
	for {
		connected, err := w.session(ctx, created, connectedBefore)
		if ctx.Err() != nil {
			return nil
		}
		if connected {
			connectedBefore = true
			b.reset()
			w.log.Warn("broker connection lost; reconnecting", "err", err)
		} else {
			w.log.Warn("cannot consume from the broker; retrying", "err", err, "in", b.peek())
		}
		if !sleep(ctx, b.next()) {
			return nil
		}
	}
}

// recoverInterrupted gives up a rebuild the state row says is running when
// no process holds the rebuild lock (its process died): the shadow is
// dropped and cleared, the state becomes failed.
func (w *Worker) recoverInterrupted(ctx context.Context) error {
	r, err := w.store.read(ctx)
	if err != nil || r.shadow == nil {
		return err
	}
	lock, ok, err := w.store.tryLock(ctx)
	if err != nil || !ok {
		return err // !ok: another process runs it
	}
	defer lock.release()
	stale, err := w.store.failInterrupted(ctx)
	if err == nil && stale != 0 {
		w.log.Warn("a rebuild was interrupted by a stop; its shadow generation was dropped", "generation", stale)
	}
	return err
}

// session connects, declares the topology, consumes N.live (and N.replay
// while a run is active) until the connection is lost or ctx is done.
// connected reports whether it got as far as consuming.
func (w *Worker) session(ctx context.Context, created, reconnect bool) (connected bool, err error) {
	conn, err := w.cfg.Dial("statemill projection " + w.cfg.Name)
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))

	liveExisted, err := w.declare(conn)
	if err != nil {
		return false, err
	}
	liveCh, deliveries, err := w.consume(conn, w.liveQueue(), w.cfg.liveBatching())
	if err != nil {
		return false, err
	}

	w.mu.Lock()
	w.conn = conn
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.conn = nil
		w.mu.Unlock()
		w.m.lagMessages.Set(-1)
	}()
	if reconnect {
		w.reconnects.Add(1)
		w.m.reconnects.Inc()
		w.log.Info("reconnected to the broker")
	}
	w.readyOnce.Do(func() { close(w.ready) })
	w.autoStart(ctx, created, liveExisted)

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	liveDone := make(chan error, 1)
	wg.Add(2 + replayConsumers)
	go func() {
		defer wg.Done()
		liveDone <- w.consumeLoop(ctx, liveCh, deliveries, w.cfg.liveBatching(), w.handleLive)
	}()
	for i := range replayConsumers {
		go func() {
			defer wg.Done()
			w.replayConsumer(sctx, conn, fmt.Sprintf("replay-%d", i+1))
		}()
	}
	go func() {
		defer wg.Done()
		w.lagLoop(sctx, conn)
	}()

	select {
	case <-ctx.Done():
	case e := <-closed:
		if e != nil {
			err = e
		} else {
			err = errors.New("connection closed")
		}
	case err = <-liveDone:
		if err == nil {
			err = errors.New("live consumer stopped")
		}
	}
	cancel()
	// On a lost connection the delivery channels close and the loops
	// return; on ctx done they finish their batch first.
	if err != nil {
		_ = conn.Close()
	}
	wg.Wait()
	return true, err
}

// autoStart acts once per Run, and again whenever N.live had to be created
// anew: with Config.RebuildOnFirstStart, a projection that never completed a
// rebuild (no replay cursor) rebuilds; a worker whose N.live did not exist
// before this start catches up from its cursor. A start that fails because
// something is unavailable (no replay responder bound yet, the broker or
// the database down) is retried with backoff until it starts, conflicts
// with another run, or Run stops.
func (w *Worker) autoStart(ctx context.Context, created, liveExisted bool) {
	w.mu.Lock()
	first := !w.autoStarted
	w.autoStarted = true
	w.mu.Unlock()
	if !first && liveExisted {
		return
	}
	w.supervisors.Add(1)
	go func() {
		defer w.supervisors.Done()
		b := backoff{min: time.Second, max: 30 * time.Second}
		for {
			kind, err := w.autoKind(ctx, first, created, liveExisted)
			if kind == "" && err == nil {
				return
			}
			if err == nil {
				var id string
				if id, err = w.start(ctx, kind); err == nil {
					w.log.Info("automatic "+string(kind)+" started", "replay_id", id)
					return
				}
			}
			if ctx.Err() != nil {
				return
			}
			if apperr.CodeOf(pgstore.Classify(err)) != apperr.Unavailable {
				w.log.Error("automatic "+string(kind)+" did not start", "err", err)
				return
			}
			d := b.next()
			w.log.Warn("automatic rebuild or catch-up cannot start yet; retrying", "in", d, "err", err)
			if !sleep(ctx, d) {
				return
			}
		}
	}()
}

func (w *Worker) autoKind(ctx context.Context, first, created, liveExisted bool) (runKind, error) {
	r, err := w.store.read(ctx)
	if err != nil {
		return "", err
	}
	switch {
	case first && w.cfg.RebuildOnFirstStart && len(r.cursors) == 0:
		return kindRebuild, nil
	case !liveExisted && len(r.cursors) > 0:
		return kindCatchUp, nil
	case !liveExisted && !created:
		w.log.Warn("N.live did not exist before this start and there is no replay cursor to catch up from: " +
			"events published while it was missing are not in the read model; rebuild it")
	}
	return "", nil
}

// declare declares the worker's topology (and, idempotently, the shared
// exchanges it binds to) and reports whether N.live existed before. With
// Topology.Passive the definitions file has declared and bound all of it
// (the worker's user has no configure permission): declare only checks that
// the exchanges and queues exist, and a missing one is a
// *broker.MissingError.
func (w *Worker) declare(conn broker.Conn) (liveExisted bool, err error) {
	t := w.cfg.Topology
	probe, err := conn.Channel()
	if err != nil {
		return false, err
	}
	liveExisted = true
	if _, err := broker.CheckQueue(probe, w.liveQueue()); err != nil {
		var me *broker.MissingError
		if !errors.As(err, &me) || t.Passive {
			return false, err
		}
		liveExisted = false // the 404 closed the probe channel
	} else {
		_ = probe.Close()
	}

	ch, err := conn.Channel()
	if err != nil {
		return false, err
	}
	defer ch.Close()
	if err := broker.DeclareShared(ch, t); err != nil {
		return false, err
	}
	dead := w.deadQueue()
	if t.Passive {
		if err := broker.CheckExchange(ch, dead); err != nil {
			return false, err
		}
		for _, q := range []string{dead, w.replayQueue()} {
			if _, err := broker.CheckQueue(ch, q); err != nil {
				return false, err
			}
		}
		return liveExisted, nil
	}
	if err := ch.ExchangeDeclare(dead, amqp091.ExchangeFanout, true, false, false, false, nil); err != nil {
		return false, fmt.Errorf("declare exchange %s: %w", dead, err)
	}
	if _, err := ch.QueueDeclare(dead, true, false, false, false, nil); err != nil {
		return false, fmt.Errorf("declare queue %s: %w", dead, err)
	}
	if err := ch.QueueBind(dead, "", dead, false, nil); err != nil {
		return false, fmt.Errorf("bind %s: %w", dead, err)
	}
	if _, err := ch.QueueDeclare(w.liveQueue(), true, false, false, false, amqp091.Table{"x-dead-letter-exchange": dead}); err != nil {
		return false, fmt.Errorf("declare queue %s: %w", w.liveQueue(), err)
	}
	for _, et := range w.cfg.EntityTypes {
		if err := ch.QueueBind(w.liveQueue(), envelope.LiveBinding(et), t.EventsExchange, false, nil); err != nil {
			return false, fmt.Errorf("bind %s to %s: %w", w.liveQueue(), envelope.LiveBinding(et), err)
		}
	}
	if err := w.declareReplay(conn); err != nil {
		return false, err
	}
	return liveExisted, nil
}

// replayQueueArgs are N.replay's arguments. Lazy: a batched replay is
// published faster than a read model applies it, so N.replay grows to
// thousands of messages during a large rebuild; a lazy queue keeps them on
// disk. Measured on RabbitMQ 3.10 during three 1,000,000-event rebuilds:
// the broker's RSS grew by 640 MB with a default queue, by 225 MB with a
// lazy one (a memory alarm would block every publisher, the live relays
// included). Brokers from 3.12 ignore the mode: their queues page anyway.
func (w *Worker) replayQueueArgs() amqp091.Table {
	return amqp091.Table{"x-dead-letter-exchange": w.deadQueue(), "x-queue-mode": "lazy"}
}

// declareReplay declares N.replay and binds it, on a channel of its own. A
// queue declared by an earlier version, without the lazy mode, is used as
// it is, with a warning: replacing it could drop a rebuild that another
// process runs on it now.
func (w *Worker) declareReplay(conn broker.Conn) error {
	q := w.replayQueue()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	defer func() { _ = ch.Close() }()
	_, err = ch.QueueDeclare(q, true, false, false, false, w.replayQueueArgs())
	var amqpErr *amqp091.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == amqp091.PreconditionFailed {
		w.log.Warn("the replay queue exists with other arguments; using it as it is. Delete it while no rebuild runs "+
			"to have it declared lazy, which keeps a large replay out of the broker's memory", "queue", q, "err", err)
		if ch, err = conn.Channel(); err != nil { // the failed declare closed the channel
			return err
		}
		_, err = broker.CheckQueue(ch, q)
	}
	if err != nil {
		return fmt.Errorf("declare queue %s: %w", q, err)
	}
	for _, et := range w.cfg.EntityTypes {
		if err := ch.QueueBind(q, envelope.ReplayBinding(w.cfg.Name, et), w.cfg.Topology.EventsExchange, false, nil); err != nil {
			return fmt.Errorf("bind %s to %s: %w", q, envelope.ReplayBinding(w.cfg.Name, et), err)
		}
	}
	return nil
}

// consume opens a channel with b's prefetch and consumes queue with manual
// acks.
func (w *Worker) consume(conn broker.Conn, queue string, b batching) (broker.Channel, <-chan amqp091.Delivery, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, nil, err
	}
	if err := ch.Qos(b.prefetch, 0, false); err != nil {
		_ = ch.Close()
		return nil, nil, fmt.Errorf("qos %s: %w", queue, err)
	}
	tag := fmt.Sprintf("statemill-%s-%08x", queue, rand.Uint32())
	deliveries, err := ch.Consume(queue, tag, false, false, false, false, nil)
	if err != nil {
		_ = ch.Close()
		return nil, nil, fmt.Errorf("consume %s: %w", queue, err)
	}
	return ch, deliveries, nil
}

// replayConsumers is the number of consumers of N.replay while a run is
// active. Replayed events may be applied in any order (the version check),
// so two transactions in flight keep the database busy while the other
// waits for its commit or for deliveries.
const replayConsumers = 2

// replayConsumer consumes N.replay while this process runs a rebuild or
// catch-up, and not otherwise: another process of the same name never
// takes (and drops) the replay of this one. source names its progress row.
func (w *Worker) replayConsumer(ctx context.Context, conn broker.Conn, source string) {
	for {
		w.mu.Lock()
		r, changed := w.cur, w.runChanged
		w.mu.Unlock()
		if r == nil {
			select {
			case <-ctx.Done():
				return
			case <-changed:
				continue
			}
		}
		err := w.consumeReplay(ctx, conn, r, source)
		if ctx.Err() != nil {
			return
		}
		select {
		case <-r.ended:
			continue
		default:
		}
		w.log.Warn("replay consumer stopped; restarting", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-r.ended:
		case <-time.After(time.Second):
		}
	}
}

func (w *Worker) consumeReplay(ctx context.Context, conn broker.Conn, r *run, source string) error {
	ch, deliveries, err := w.consume(conn, w.replayQueue(), w.cfg.replayBatching())
	if err != nil {
		return err
	}
	// Closing the channel hands back what was delivered and not acked.
	defer ch.Close()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.ended:
			cancel()
		case <-rctx.Done():
		}
	}()
	return w.consumeLoop(rctx, ch, deliveries, w.cfg.replayBatching(), func(ctx context.Context, ch broker.Channel, batch []amqp091.Delivery) {
		w.handleReplay(ctx, ch, r, source, batch)
	})
}

// lagLoop keeps the lag gauges fresh.
func (w *Worker) lagLoop(ctx context.Context, conn broker.Conn) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		if n, err := w.readyMessages(ctx, conn); err == nil {
			w.m.lagMessages.Set(float64(n))
		}
		w.m.lagSeconds.Set(w.lagSeconds())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// readyMessages asks the broker how many messages are ready in N.live.
func (w *Worker) readyMessages(ctx context.Context, conn broker.Conn) (int64, error) {
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() { // channel operations take no context
		ch, err := conn.Channel()
		if err != nil {
			done <- result{err: err}
			return
		}
		q, err := ch.QueueDeclarePassive(w.liveQueue(), true, false, false, false, nil)
		if err == nil {
			_ = ch.Close()
		}
		done <- result{int64(q.Messages), err}
	}()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	select {
	case r := <-done:
		return r.n, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// lagSeconds is the age of the oldest live event being applied.
func (w *Worker) lagSeconds() float64 {
	since := w.pendingSince.Load()
	if since == 0 {
		return 0
	}
	return max(0, time.Since(time.Unix(0, since)).Seconds())
}

func (w *Worker) current() *run {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cur
}

func (w *Worker) currentConn() broker.Conn {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.conn
}

func (w *Worker) notifyRunChanged() {
	w.mu.Lock()
	close(w.runChanged)
	w.runChanged = make(chan struct{})
	w.mu.Unlock()
}

// transient reports whether err is worth retrying: the database is
// unreachable, a dependency is unavailable, a deadline passed, or
// PostgreSQL asked for a retry (serialization failure, deadlock, lock or
// statement timeout, resources).
func transient(err error) bool {
	if err == nil {
		return false
	}
	if pgstore.Unreachable(err) || apperr.CodeOf(err) == apperr.Unavailable || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	if code := pgCode(err); code != "" {
		switch code {
		case "40001", "40P01", "55P03", "57014":
			return true
		}
		return code[:2] == "53" // insufficient resources
	}
	return false
}

// applyTimeout bounds one attempt of a batch transaction, so a black-holed
// connection becomes a transient failure and is retried.
const applyTimeout = 30 * time.Second

// errStopped means a retry loop gave up because the worker is stopping or
// the deliveries' channel is gone (they will be redelivered).
var errStopped = errors.New("projection: stopped")

// retry runs fn until it succeeds, fails permanently, ctx is done or
// stop() says the work is moot, backing off exponentially (100ms to 5s)
// between transient failures. Each attempt gets a context that ctx's
// cancellation does not abort, so a transaction in flight finishes.
func retry(ctx context.Context, w *Worker, what string, stop func() bool, fn func(context.Context) error) error {
	b := backoff{min: 100 * time.Millisecond, max: 5 * time.Second}
	for attempt := 1; ; attempt++ {
		if ctx.Err() != nil || (stop != nil && stop()) {
			return errStopped
		}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), applyTimeout)
		err := fn(actx)
		cancel()
		if !transient(err) {
			return err
		}
		w.retries.Add(1)
		w.m.retries.Inc()
		d := b.next()
		w.log.Warn("transient failure; retrying", "what", what, "attempt", attempt, "in", d, "err", err)
		if !sleep(ctx, d) {
			return errStopped
		}
	}
}

// backoff is exponential with jitter.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) peek() time.Duration {
	if b.cur == 0 {
		return b.min
	}
	return b.cur
}

func (b *backoff) next() time.Duration {
	d := b.peek()
	b.cur = min(d*2, b.max)
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx is done; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
