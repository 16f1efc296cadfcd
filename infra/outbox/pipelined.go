package outbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/statemill/statemill/infra/broker"
)

// PipelinedConfig configures a PipelinedRelay. Zero values take the defaults.
type PipelinedConfig struct {
	Pool    *pgxpool.Pool
	AMQPURL string // the relay dials, and redials, a publishing connection of its own
	// Dial, when set, opens that connection instead of dialling AMQPURL
	// (the embedded mode's in-process broker).
	Dial     broker.Dialer
	Exchange string // the topic exchange events go to; an envelope's topic is the routing key
	Topic    string // the outbox topic written by the store (table watermill_<topic>)

	// ConsumerGroup names the offsets row, the same row a ForwarderRelay of
	// this group uses, so either kind picks up where the other stopped.
	// PipelinedRelays of one group take turns. Default "relay".
	ConsumerGroup string
	// BatchSize is the rows read, published and acknowledged together.
	// Default 500.
	BatchSize int
	// Window bounds the unconfirmed publishes. Default
	// broker.DefaultConfirmWindow (256).
	Window int
	// PollInterval is how often a relay that found rows within IdleAfter
	// looks again: while work keeps coming it polls, cheaply (a read that
	// takes no lock and no xid), instead of having every command notify.
	// Default 5ms.
	PollInterval time.Duration
	// IdleAfter is how long without rows before the relay sleeps and asks
	// commands to wake it with NOTIFY. Default 100ms.
	IdleAfter time.Duration
	// IdlePollInterval is how often a sleeping relay looks anyway: a row can
	// become visible later than its NOTIFY (an older transaction still held
	// pg_snapshot_xmin back), and notifications are lost while the listener
	// reconnects. Default 250ms.
	IdlePollInterval time.Duration
	// BatchDeadline bounds how long one run reads batches (and so how long
	// a relay keeps its turn before others may take it), how long a
	// published batch may wait for its confirms, and the run's final wait
	// for them. Default 5s.
	BatchDeadline time.Duration
	// Retention is how long published rows stay for inspection. Default 1h.
	Retention time.Duration
	// PruneInterval is how often published rows are deleted. Default 1m.
	PruneInterval time.Duration

	Logger watermill.LoggerAdapter
}

func (c *PipelinedConfig) setDefaults() {
	if c.Dial == nil && c.AMQPURL != "" {
		c.Dial = broker.AMQPDialer(c.AMQPURL)
	}
	if c.ConsumerGroup == "" {
		c.ConsumerGroup = defaultConsumerGroup
	}
	if c.BatchSize == 0 {
		c.BatchSize = 500
	}
	if c.Window == 0 {
		c.Window = broker.DefaultConfirmWindow
	}
	if c.PollInterval == 0 {
		c.PollInterval = 5 * time.Millisecond
	}
	if c.IdleAfter == 0 {
		c.IdleAfter = 100 * time.Millisecond
	}
	if c.IdlePollInterval == 0 {
		c.IdlePollInterval = 250 * time.Millisecond
	}
	if c.BatchDeadline == 0 {
		c.BatchDeadline = 5 * time.Second
	}
	if c.Retention == 0 {
		c.Retention = defaultRetention
	}
	if c.PruneInterval == 0 {
		c.PruneInterval = defaultPruneInterval
	}
	if c.Logger == nil {
		c.Logger = watermill.NopLogger{}
	}
}

// Validate reports a config the relay cannot run with.
func (c PipelinedConfig) Validate() error {
	var errs []error
	if c.Pool == nil {
		errs = append(errs, errors.New("outbox: Pool is required"))
	}
	if c.AMQPURL == "" && c.Dial == nil {
		errs = append(errs, errors.New("outbox: AMQPURL or Dial is required"))
	}
	if c.Exchange == "" {
		errs = append(errs, errors.New("outbox: Exchange is required"))
	}
	if c.Topic == "" {
		errs = append(errs, errors.New("outbox: Topic is required"))
	}
	if c.BatchSize < 0 || c.Window < 0 || c.PollInterval < 0 || c.IdleAfter < 0 || c.IdlePollInterval < 0 ||
		c.BatchDeadline < 0 || c.Retention < 0 || c.PruneInterval < 0 {
		errs = append(errs, errors.New("outbox: durations and sizes must not be negative"))
	}
	return errors.Join(errs...)
}

// maxBlockedPoll bounds the wait between looks while committed rows wait
// behind an older open transaction: once it ends they go out within this.
const maxBlockedPoll = 250 * time.Millisecond

// PipelinedStats counts what a PipelinedRelay did.
type PipelinedStats struct {
	Polls      int64 // looks at the outbox, empty ones included
	Batches    int64 // batches published and acknowledged
	Published  int64 // rows published and acknowledged (a republished row counts again)
	Skipped    int64 // rows that were no forwarder envelope, logged and passed over
	Reconnects int64 // broker connections dialled after a failure
	LostRaces  int64 // batches whose offset advance found the offsets moved by another relay
	// MaxBatch is the longest run, from taking the turn to the last
	// offset advance: how long this relay kept its turn.
	MaxBatch time.Duration
	// MaxXIDHold is the longest an offset advance had an xid (its UPDATE
	// and commit): how long this relay held back pg_snapshot_xmin, and with
	// it every outbox reader in the cluster.
	MaxXIDHold time.Duration
}

// PipelinedRelay relays the same watermill-sql tables as ForwarderRelay,
// batch by batch with pipelined publisher confirms: it reads up to
// BatchSize rows after the last row it published, publishes them with up
// to Window confirms outstanding, and moves the offset past each batch once
// its confirms are in, reading on meanwhile (relayRun says how, and how
// relays take turns). It uses two connections of the pool while it
// publishes: one holds its turn, the other moves the offset. Watermill's
// forwarder waits for each confirm before the next publish, which held it
// near 2.2k events/s while PostgreSQL commits about 10k command
// transactions/s (baselines H12, H3).
//
// Idle, it sleeps until a command's NOTIFY (the trigger of pgstore's
// migration 00003) or IdlePollInterval; busy, it polls every PollInterval.
// It outlives PostgreSQL and RabbitMQ outages: a failed batch is rolled
// back and read again after a backoff, on a new broker connection.
type PipelinedRelay struct {
	config  PipelinedConfig
	tables  outboxTable
	channel string // the NOTIFY channel: the messages table's name

	wake      chan struct{} // a command notified, or Flush wants a look now
	listening atomic.Bool   // the listener connection is LISTENing

	running     chan struct{}
	runningOnce sync.Once
	closed      chan struct{}
	closeOnce   sync.Once

	// Owned by Run's goroutine.
	broker      brokerSession
	needOffsets bool // the offsets row must be ensured before the next batch
	wakeErrSeen bool // a failure to set the wake-up flag was logged

	polls, batches, published, skipped, reconnects, lostRaces atomic.Int64
	maxBatch, maxXIDHold                                      atomic.Int64 // durations
}

var _ Relay = (*PipelinedRelay)(nil)

// NewPipelinedRelay builds a relay. The outbox tables and the wake-up
// trigger must exist (pgstore's migrations); without the trigger the relay
// still works, polling every IdlePollInterval when idle.
func NewPipelinedRelay(c PipelinedConfig) (*PipelinedRelay, error) {
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	t := newOutboxTable(c.Pool, c.Topic, c.ConsumerGroup, c.Retention, c.PruneInterval, c.Logger)
	return &PipelinedRelay{
		config:      c,
		tables:      t,
		channel:     strings.Trim(t.table, `"`),
		wake:        make(chan struct{}, 1),
		running:     make(chan struct{}),
		closed:      make(chan struct{}),
		broker:      brokerSession{dial: c.Dial, window: c.Window},
		needOffsets: true,
	}, nil
}

// Running is closed once the relay has first read the outbox with a broker
// connection ready.
func (r *PipelinedRelay) Running() <-chan struct{} { return r.running }

// Close stops Run. A batch in flight is finished first (within BatchDeadline).
func (r *PipelinedRelay) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

// Pending counts rows not yet published.
func (r *PipelinedRelay) Pending(ctx context.Context) (int64, error) { return r.tables.pending(ctx) }

// Flush waits until every row committed so far is published, or ctx ends.
// It wakes the relay, so a row whose notification raced the relay's
// falling asleep does not wait for IdlePollInterval.
func (r *PipelinedRelay) Flush(ctx context.Context) error {
	return r.tables.flush(ctx, 10*time.Millisecond, r.poke)
}

// Prune deletes published rows older than the retention (see outboxTable.prune).
func (r *PipelinedRelay) Prune(ctx context.Context) (int64, error) { return r.tables.prune(ctx) }

// Stats reports what the relay has done so far.
func (r *PipelinedRelay) Stats() PipelinedStats {
	return PipelinedStats{
		Polls:      r.polls.Load(),
		Batches:    r.batches.Load(),
		Published:  r.published.Load(),
		Skipped:    r.skipped.Load(),
		Reconnects: r.reconnects.Load(),
		LostRaces:  r.lostRaces.Load(),
		MaxBatch:   time.Duration(r.maxBatch.Load()),
		MaxXIDHold: time.Duration(r.maxXIDHold.Load()),
	}
}

// markRunning closes running once the relay has read the outbox with a
// broker connection ready.
func (r *PipelinedRelay) markRunning() { r.runningOnce.Do(func() { close(r.running) }) }

func (r *PipelinedRelay) poke() {
	select {
	case r.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// Run relays, listens for wake-ups and prunes until ctx is done or Close is
// called. Failures are logged and retried with backoff; Run returns nil.
func (r *PipelinedRelay) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait() // after cancel: the listener and the pruner stop on ctx
	defer cancel()
	go func() {
		select {
		case <-r.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	wg.Go(func() { r.tables.pruneLoop(ctx) })
	wg.Go(func() { r.listen(ctx) })
	defer r.broker.drop()

	asleep := r.loop(ctx)
	if asleep {
		// Commands need not notify a relay that has stopped.
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		r.setWaiting(cctx, false)
		ccancel()
	}
	return nil
}

// loop runs batches until ctx ends and reports whether it left the wake-up
// flag set.
//
// Why the flag: every transaction that NOTIFYs serialises its commit on one
// cluster-wide lock held until after its WAL flush, so notifying commands
// lose group commit (pgbench, 4 clients: 0.7x the commit rate, median of 10
// pairs, when every command notified; see migration 00003). So commands
// notify only while the relay sleeps; while rows keep coming the relay
// polls every PollInterval with a read that takes no lock and no xid.
func (r *PipelinedRelay) loop(ctx context.Context) (asleep bool) {
	var (
		failures int
		blocked  int // looks in a row that found rows held behind an older transaction
		lastWork = time.Now()
		probe    bool // the last look found nothing: check cheaply before locking
	)
	for ctx.Err() == nil {
		l, err := r.step(ctx, probe, &asleep)
		if err != nil {
			if ctx.Err() != nil {
				return asleep
			}
			failures++
			wait := backoff(failures, 100*time.Millisecond, 5*time.Second)
			r.config.Logger.Error("outbox relay: batch failed; retrying", err, watermill.LogFields{"in": wait.String(), "failures": failures})
			if !sleepCtx(ctx, wait) {
				return asleep
			}
			continue
		}
		if failures > 0 {
			r.config.Logger.Info("outbox relay: recovered", watermill.LogFields{"after_failures": failures})
		}
		failures = 0
		r.markRunning()
		probe = l.rows == 0
		if l.rows > 0 || l.blocked {
			lastWork = time.Now()
		}
		if l.full {
			continue // more is waiting: read again at once
		}
		if l.blocked {
			// The older transaction may stay open for long: back off, up
			// to the idle poll (at most maxBlockedPoll), rather than poll
			// every 5ms for minutes.
			blocked++
			r.wait(ctx, backoff(blocked, r.config.PollInterval, min(r.config.IdlePollInterval, maxBlockedPoll)))
			continue
		}
		blocked = 0
		if time.Since(lastWork) < r.config.IdleAfter {
			r.wait(ctx, r.config.PollInterval)
			continue
		}
		if !asleep && r.listening.Load() && r.setWaiting(ctx, true) {
			asleep = true
			// Look once more before sleeping: a row committed after the
			// last look but inserted before the flag was set sent no
			// NOTIFY. (One inserted before the flag and committed after
			// this look waits for the next NOTIFY or IdlePollInterval.)
			continue
		}
		r.wait(ctx, r.config.IdlePollInterval)
	}
	return asleep
}

// wait returns after d, on a wake-up, or when ctx ends.
func (r *PipelinedRelay) wait(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-r.wake:
	case <-t.C:
	}
}

// look is what one step found.
type look struct {
	rows    int  // rows relayed (published, or skipped as no envelope)
	full    bool // the batch was full: more is likely waiting
	blocked bool // committed rows wait behind an older open transaction
}

// step relays one batch, looking first without a lock when probe is set.
// When it finds work, or committed rows that become visible once an older
// transaction ends, a sleeping relay wakes up before it publishes: it will
// poll from now on, so commands can stop notifying.
func (r *PipelinedRelay) step(ctx context.Context, probe bool, asleep *bool) (look, error) {
	reconnect, err := r.broker.ensure()
	if reconnect {
		r.reconnects.Add(1)
	}
	if err != nil {
		return look{}, err
	}
	if r.needOffsets {
		if err := r.tables.ensureOffsetsRow(ctx); err != nil {
			return look{}, err
		}
		r.needOffsets = false
	}
	r.polls.Add(1)
	ready := true
	if probe {
		var blocked bool
		var err error
		ready, blocked, err = r.visibleRows(ctx)
		if err != nil {
			return look{}, err
		}
		if !ready && !blocked {
			return look{}, nil
		}
	}
	if *asleep {
		*asleep = !r.setWaiting(ctx, false)
	}
	if !ready {
		return look{blocked: true}, nil
	}
	n, full, err := r.relayRun(ctx)
	return look{rows: n, full: full}, err
}

// visibleRows reports whether a batch would find rows (ready), or whether
// committed rows wait behind a transaction older than them that is still
// open somewhere in the cluster (blocked: a NOTIFY can arrive before its
// row is visible under watermill-sql's rule). It reads the first row after
// the offset in index order: if that row is not visible yet, no later one
// is. It takes no lock and so no xid, so an idle relay's polls cost
// PostgreSQL little. It says ready when the offsets row is missing, so
// relayRun recreates it.
func (r *PipelinedRelay) visibleRows(ctx context.Context) (ready, blocked bool, err error) {
	var missing bool
	var visible *bool // nil: no row after the offset
	err = r.config.Pool.QueryRow(ctx, `
		SELECT f.consumer_group IS NULL, o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
		FROM (SELECT 1) one
		LEFT JOIN `+r.tables.offsets+` f ON f.consumer_group = $1
		LEFT JOIN LATERAL (
			SELECT transaction_id FROM `+r.tables.table+`
			WHERE (transaction_id, "offset") > (f.last_processed_transaction_id, COALESCE(f.offset_acked, 0))
			ORDER BY transaction_id, "offset" LIMIT 1) o ON true`,
		r.config.ConsumerGroup).Scan(&missing, &visible)
	if err != nil {
		return false, false, fmt.Errorf("outbox: look for rows: %w", err)
	}
	if missing {
		return true, false, nil
	}
	if visible == nil {
		return false, false, nil
	}
	return *visible, !*visible, nil
}

// outboxRow is one row of a batch.
type outboxRow struct {
	offset  int64
	xid     string // xid8 as text: pgx has no xid8 codec, and text round-trips exactly
	payload []byte
}

// position is a place in the outbox: a row's (transaction_id, offset).
type position struct {
	xid    string
	offset int64
}

// flight is a batch published whose offset advance waits for its confirms.
type flight struct {
	end     position // its last row: where the offset moves once it is confirmed
	seq     uint64   // the publish sequence number of its last message
	rows    int
	skipped int
	at      time.Time
}

// relayRun publishes batches while rows keep coming, and moves the offset
// past each batch once its confirms are in. It returns the rows it handled
// and whether rows were still coming when the run ended (relay again at
// once); zero rows when another relay of the group holds the turn or moved
// the offset first.
//
// Reading the next batch does not wait for the last one's confirms: a
// persistent message is confirmed once it is on disk or acknowledged by its
// consumers, tens of milliseconds under load, and a relay that waited for
// them before reading again held every newer event back that long (S3 of
// the benchmark: commit → applied p99 127-189 ms at 800 commands/s; 74-107 ms
// with the wait left out). The offset still moves only over batches whose
// every message is confirmed, in order, so a failure at any point publishes
// at most the unconfirmed batches again.
//
// How relays take turns, and why the offset is not held FOR UPDATE while
// publishing (as the forwarder does): a row lock gives the transaction an
// xid, and every outbox reader in the cluster (watermill-sql's rule reads
// below the oldest running xid) then waits for the whole publish. Measured
// here, other relays' batch transactions held back delivery by 150ms-1.6s
// on a loaded box. So:
//   - the run holds its turn with a transaction-level advisory lock
//     (try-lock: a relay that does not get it looks again later) in a
//     READ COMMITTED transaction that only reads: it never takes an xid,
//     and between its statements it holds back no snapshot;
//   - each advance is a short transaction of its own on another connection
//     of the pool: a compare-and-set on the position the run last wrote,
//     which moves nothing if another relay moved the offset meanwhile (a
//     ForwarderRelay knows nothing of the advisory lock, and a relay whose
//     connection dropped may have lost its turn). The forwarder holds the
//     row lock for its whole batch and reads in REPEATABLE READ, so neither
//     can move the offset back; the worst of running both is a batch
//     published twice.
//
// Only the advances run with an xid (Stats().MaxXIDHold). A run reads for
// at most BatchDeadline, then waits at most BatchDeadline more for its last
// confirms (its watchdog closes the broker connection, which unblocks a
// publish stuck on a blocked connection); any broker error ends it at once,
// and the backoff and reconnect happen outside it.
func (r *PipelinedRelay) relayRun(ctx context.Context) (int, bool, error) {
	// A run is finished on shutdown, reading no more: cancelling it after
	// the confirms would only publish its batches again later.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*r.config.BatchDeadline)
	defer cancel()
	conn, pub := r.broker.conn, r.broker.pub
	stopWatchdog := context.AfterFunc(rctx, func() { _ = conn.Close() })
	defer stopWatchdog() // runs before cancel: a run that ended in time keeps its connection

	began := time.Now()
	defer func() { storeMax(&r.maxBatch, time.Since(began)) }()
	// READ COMMITTED whatever the server's default: each read sees the rows
	// committed since the last, and no snapshot outlives its statement.
	tx, err := r.config.Pool.BeginTx(rctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted, AccessMode: pgx.ReadOnly})
	if err != nil {
		return 0, false, fmt.Errorf("outbox: begin batch: %w", err)
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = tx.Rollback(cctx) // it wrote nothing: ending it releases the turn
		ccancel()
	}()

	var turn bool
	if err := tx.QueryRow(rctx, `SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))`,
		"statemill outbox relay "+r.tables.table+" "+r.config.ConsumerGroup).Scan(&turn); err != nil {
		return 0, false, fmt.Errorf("outbox: take the relay turn: %w", err)
	}
	if !turn {
		return 0, false, nil // another relay of the group is publishing
	}
	var committed position
	err = tx.QueryRow(rctx, `
		SELECT last_processed_transaction_id::text, COALESCE(offset_acked, 0)
		FROM `+r.tables.offsets+` WHERE consumer_group = $1`,
		r.config.ConsumerGroup).Scan(&committed.xid, &committed.offset)
	if errors.Is(err, pgx.ErrNoRows) {
		r.needOffsets = true
		return 0, false, fmt.Errorf("outbox: offsets row of %q is missing; recreating it", r.config.ConsumerGroup)
	}
	if err != nil {
		return 0, false, fmt.Errorf("outbox: read offsets: %w", err)
	}

	var (
		read    = committed // the position after the last row published
		flights []flight
		handled int
		last    int // rows of the last read
	)
	for {
		reading := ctx.Err() == nil && time.Since(began) < r.config.BatchDeadline
		if reading {
			batch, err := r.readBatch(rctx, tx, read)
			if err != nil {
				return handled, false, err
			}
			r.markRunning() // before the run ends: it may go on for a while
			last = len(batch)
			if len(batch) > 0 {
				skipped, err := r.publish(rctx, pub, batch)
				if err != nil {
					r.broker.drop()
					return handled, false, err
				}
				end := batch[len(batch)-1]
				read = position{xid: end.xid, offset: end.offset}
				flights = append(flights, flight{end: read, seq: pub.Sent(), rows: len(batch), skipped: skipped, at: time.Now()})
			}
		}

		// Move the offset over the batches confirmed so far.
		confirmed, err := pub.Confirmed()
		if err != nil {
			r.broker.drop()
			return handled, false, fmt.Errorf("outbox: confirms: %w", err)
		}
		k := 0
		for k < len(flights) && flights[k].seq <= confirmed {
			k++
		}
		if k > 0 {
			moved, err := r.advance(rctx, committed, flights[k-1].end)
			if err != nil {
				return handled, false, err
			}
			if !moved {
				// Another relay moved the offset while this one published:
				// what this run sent went out twice, and it goes on from there.
				r.lostRaces.Add(1)
				r.config.Logger.Info("outbox relay: another relay moved the offsets first; this run's batches were sent twice",
					watermill.LogFields{"batches": len(flights)})
				return handled, false, nil
			}
			committed = flights[k-1].end
			for _, f := range flights[:k] {
				r.batches.Add(1)
				r.published.Add(int64(f.rows - f.skipped))
				r.skipped.Add(int64(f.skipped))
				handled += f.rows
			}
			flights = flights[k:]
		}

		switch {
		case len(flights) == 0 && (!reading || last == 0):
			return handled, !reading && last > 0, tx.Commit(rctx)
		case reading && last == r.config.BatchSize:
			continue // more is waiting: read again at once
		case len(flights) > 0 && time.Since(flights[0].at) > r.config.BatchDeadline:
			r.broker.drop()
			return handled, false, fmt.Errorf("outbox: no confirms for %s", r.config.BatchDeadline)
		}
		// Wait for the oldest batch's confirms; while reading, no longer
		// than PollInterval, so newer rows go out meanwhile.
		wait := r.config.BatchDeadline
		if reading {
			wait = r.config.PollInterval
		}
		wctx, wcancel := context.WithTimeout(rctx, wait)
		if len(flights) > 0 {
			err = pub.WaitFor(wctx, flights[0].seq)
		} else {
			<-wctx.Done()
		}
		wcancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			r.broker.drop()
			return handled, false, fmt.Errorf("outbox: confirms: %w", err)
		}
	}
}

// readBatch reads up to BatchSize rows after from, under watermill-sql's
// visibility rule exactly (DefaultPostgreSQLSchema.SelectQuery): after the
// position in (xid, offset) order, and only rows of transactions older than
// every transaction still running, so a transaction that commits later can
// never land behind the offset. Its "(xid = X AND offset > O) OR xid > X"
// is written as the row comparison it equals, which the primary key bounds
// on both sides: the OR form's generic plan filtered the whole published
// prefix (716ms against 0.5ms over 220k published rows). The text column
// is aliased: under its own name, ORDER BY would sort by the text.
func (r *PipelinedRelay) readBatch(ctx context.Context, tx pgx.Tx, from position) ([]outboxRow, error) {
	rows, err := tx.Query(ctx, `
		SELECT "offset", transaction_id::text AS xid, payload FROM `+r.tables.table+`
		WHERE (transaction_id, "offset") > ($1::text::xid8, $2)
		  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
		ORDER BY transaction_id, "offset"
		LIMIT $3`, from.xid, from.offset, r.config.BatchSize)
	if err != nil {
		return nil, fmt.Errorf("outbox: read batch: %w", err)
	}
	batch, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (outboxRow, error) {
		var o outboxRow
		err := row.Scan(&o.offset, &o.xid, &o.payload)
		return o, err
	})
	if err != nil {
		return nil, fmt.Errorf("outbox: read batch: %w", err)
	}
	return batch, nil
}

// publish sends a batch's messages, pipelined, and returns how many rows it
// skipped. As ForwarderRelay's AckWhenCannotUnwrap, a row that is not an
// envelope can never be published, and retrying it would stall the outbox
// for good: it is logged and passed over.
func (r *PipelinedRelay) publish(ctx context.Context, pub *broker.ConfirmPublisher, batch []outboxRow) (skipped int, err error) {
	for _, row := range batch {
		routingKey, msg, err := unwrapEnvelope(row.payload)
		if err != nil {
			r.config.Logger.Error("outbox relay: row is not a forwarder envelope; skipped", err,
				watermill.LogFields{"offset": row.offset, "transaction_id": row.xid})
			skipped++
			continue
		}
		p, err := broker.Marshaler{}.Marshal(msg)
		if err != nil {
			r.config.Logger.Error("outbox relay: cannot marshal the message; skipped", err,
				watermill.LogFields{"offset": row.offset, "transaction_id": row.xid, "uuid": msg.UUID})
			skipped++
			continue
		}
		if err := pub.Publish(ctx, r.config.Exchange, routingKey, p); err != nil {
			return skipped, fmt.Errorf("outbox: publish %s: %w", msg.UUID, err)
		}
	}
	return skipped, nil
}

// advance moves the offsets row from from to to, if it is still at from, in
// a short transaction of its own, and reports whether it moved. It commits
// without waiting for its WAL flush: losing it in a PostgreSQL crash (at
// most 3 x wal_writer_delay of advances) only publishes those batches
// again, which at-least-once allows, and the run loses no disk flush.
// Other sessions see the new offset at once either way.
func (r *PipelinedRelay) advance(ctx context.Context, from, to position) (bool, error) {
	xidFrom := time.Now()
	tx, err := r.config.Pool.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("outbox: advance offsets: %w", err)
	}
	defer func() {
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = tx.Rollback(rctx) // after Commit, a no-op
		rcancel()
	}()
	b := &pgx.Batch{}
	b.Queue(`SET LOCAL synchronous_commit = off`)
	var moved int64
	b.Queue(`
		UPDATE `+r.tables.offsets+` SET offset_acked = $2, last_processed_transaction_id = $3::text::xid8
		WHERE consumer_group = $1
		  AND last_processed_transaction_id = $4::text::xid8 AND COALESCE(offset_acked, 0) = $5`,
		r.config.ConsumerGroup, to.offset, to.xid, from.xid, from.offset).Exec(func(tag pgconn.CommandTag) error {
		moved = tag.RowsAffected()
		return nil
	})
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return false, fmt.Errorf("outbox: advance offsets: %w", err)
	}
	// A failed commit leaves the offset where it was: the batches, already
	// confirmed, are published again (at least once; consumers check versions).
	if err := tx.Commit(ctx); err != nil {
		return false, fmt.Errorf("outbox: commit offsets: %w", err)
	}
	storeMax(&r.maxXIDHold, time.Since(xidFrom))
	return moved == 1, nil
}

// storeMax raises m to d when d is larger.
func storeMax(m *atomic.Int64, d time.Duration) {
	for {
		cur := m.Load()
		if int64(d) <= cur || m.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

// backoff is base doubled per failure beyond the first, capped at ceiling.
func backoff(failures int, base, ceiling time.Duration) time.Duration {
	d := base
	for i := 1; i < failures && d < ceiling; i++ {
		d *= 2
	}
	return min(d, ceiling)
}

// sleepCtx waits d and reports false when ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
