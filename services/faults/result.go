package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"
)

// result is one scenario's line of the report. The keys named by the
// issue (attempted, acknowledged, history_rows, events_published,
// events_applied, lost, duplicates_applied, converged) come first.
type result struct {
	Name              string           `json:"name"`
	Description       string           `json:"description"`
	Commands          int              `json:"commands"`
	Attempted         int64            `json:"attempted"`
	Acknowledged      int64            `json:"acknowledged"`
	HistoryRows       int64            `json:"history_rows"`
	EventsPublished   int64            `json:"events_published"` // distinct event ids the broker routed to the audit queue
	EventsApplied     map[string]int64 `json:"events_applied"`   // per projection: deliveries applied to its active model
	Lost              int64            `json:"lost"`
	DuplicatesApplied int64            `json:"duplicates_applied"`
	Converged         bool             `json:"converged"`

	// What else became of the commands.
	Rejected      int64          `json:"rejected"`      // answered 4xx: refused, nothing changed
	Indeterminate int64          `json:"indeterminate"` // no answer before the deadline
	Retries       int64          `json:"retries"`       // attempts beyond the first, same Idempotency-Key
	ServerErrors  int64          `json:"server_errors"` // 5xx answers other than 503
	AckedByKind   map[string]int `json:"acknowledged_by_kind"`
	HungAttempts  int64          `json:"hung_attempts"` // attempts answered after 5s or not at all within the 10s client timeout
	Latency       struct {
		P50         float64 `json:"p50"`
		P99         float64 `json:"p99"`
		Max         float64 `json:"max"`
		SlowAttempt float64 `json:"slowest_attempt"`
	} `json:"command_ms"` // first attempt to outcome, retries included

	Rejections     []string `json:"rejections,omitempty"`
	ServerSample   []string `json:"server_error_sample,omitempty"`
	DoubleExecuted int64    `json:"double_executed"` // acknowledged commands whose key has more history rows than the command makes
	PhantomWrites  int64    `json:"phantom_writes"`  // history rows of no acknowledged or indeterminate command

	// What became of the events.
	DeliveriesPublished int64    `json:"deliveries_published"` // every delivery to the audit queue, redeliveries of the relay included
	DuplicatesPublished int64    `json:"duplicates_published"` // deliveries_published - events_published: absorbed by the version check
	Unpublished         int64    `json:"unpublished"`          // history rows whose event never reached the broker
	UnknownEvents       int64    `json:"unknown_events"`       // events on the broker that history does not have
	VersionRegressions  int64    `json:"version_regressions"`  // older versions written over newer ones in the read model
	ReadModelWrites     int64    `json:"read_model_writes"`    // row writes of the catalog (all generations)
	DeadLettered        int64    `json:"dead_lettered"`        // messages in catalog.dead
	Unroutable          int64    `json:"unroutable"`           // messages in events.unroutable
	LostSample          []string `json:"lost_sample,omitempty"`
	Checksums           struct {
		Write   string `json:"write_model"`
		Catalog string `json:"catalog"`
		Rebuild string `json:"fresh_rebuild"`
	} `json:"checksums"`

	Fault           *faultReport       `json:"fault"`
	UnexpectedExits []string           `json:"unexpected_exits,omitempty"`
	Phases          map[string]float64 `json:"phase_seconds"`
	LoadSeconds     float64            `json:"load_seconds"`
	SettleSeconds   float64            `json:"settle_seconds"` // from the end of the faults until the catalog matched the write model
	DurationSeconds float64            `json:"duration_seconds"`
	Errors          []string           `json:"errors,omitempty"`
	Failures        []string           `json:"failures,omitempty"`
	OK              bool               `json:"ok"`
}

func (r *result) addError(err error) {
	if err != nil {
		r.Errors = append(r.Errors, err.Error())
	}
}

// evaluate decides whether the scenario passed, and says why not.
func (r *result) evaluate() {
	fail := func(format string, args ...any) { r.Failures = append(r.Failures, fmt.Sprintf(format, args...)) }
	for _, e := range r.Errors {
		fail("error: %s", e)
	}
	if r.Lost > 0 {
		fail("%d acknowledged commands lost", r.Lost)
	}
	if r.DuplicatesApplied > 0 {
		fail("%d events applied twice", r.DuplicatesApplied)
	}
	if r.VersionRegressions > 0 {
		fail("%d older versions written over newer ones", r.VersionRegressions)
	}
	if !r.Converged {
		fail("not converged: write model %s, catalog %s, fresh rebuild %s", r.Checksums.Write, r.Checksums.Catalog, r.Checksums.Rebuild)
	}
	if r.Unpublished > 0 {
		fail("%d history rows never published", r.Unpublished)
	}
	if r.UnknownEvents > 0 {
		fail("%d published events are not in history", r.UnknownEvents)
	}
	if r.DoubleExecuted > 0 {
		fail("%d retried commands fired twice", r.DoubleExecuted)
	}
	if r.PhantomWrites > 0 {
		fail("%d history rows belong to no acknowledged or pending command", r.PhantomWrites)
	}
	if r.Indeterminate > 0 {
		fail("%d commands never answered", r.Indeterminate)
	}
	if r.HungAttempts > 0 {
		fail("%d attempts hung (no answer within %s)", r.HungAttempts, hungAfter)
	}
	if r.ServerErrors > 0 {
		fail("%d unexpected server errors (5xx other than 503)", r.ServerErrors)
	}
	if r.Unroutable > 0 {
		fail("%d messages unroutable", r.Unroutable)
	}
	var poison int64
	if r.Fault != nil {
		poison = r.Fault.PoisonInjected
		for _, p := range r.Fault.Problems {
			fail("%s", p)
		}
	}
	if r.DeadLettered != poison {
		fail("%d messages dead-lettered, %d poison injected", r.DeadLettered, poison)
	}
	for _, x := range r.UnexpectedExits {
		fail("%s", x)
	}
	r.OK = len(r.Failures) == 0
}

// runScenario runs one scenario from an empty system to its verdict.
func (s *suite) runScenario(ctx context.Context, sc scenario) *result {
	res := &result{Name: sc.name, Description: sc.desc, Commands: s.p.commands, EventsApplied: map[string]int64{}, Fault: &faultReport{},
		Phases: map[string]float64{}}
	phase := time.Now()
	lap := func(name string) {
		res.Phases[name] = round(time.Since(phase).Seconds())
		phase = time.Now()
	}
	start := time.Now()
	defer func() {
		res.DurationSeconds = round(time.Since(start).Seconds())
		res.evaluate()
	}()
	e, err := s.newEnv(ctx, sc)
	defer func() {
		phase = time.Now()
		if terr := e.teardown(ctx); terr != nil {
			s.log.Warn("scenario teardown", "scenario", sc.name, "err", terr)
		}
		lap("teardown")
	}()
	if err != nil {
		res.addError(fmt.Errorf("setup: %w", err))
		return res
	}
	lap("setup")

	l := newLoad(loadConfig{
		commands: s.p.commands, products: s.p.products, clients: s.p.clients, duration: s.p.duration, gates: sc.gates,
		deadline: s.p.deadline, prefix: s.runID + "-" + sc.name, seed: uint64(sc.number)*7919 + uint64(time.Now().UnixNano()),
	}, e.products)
	fctx, cancel := context.WithCancel(ctx)
	faultDone := make(chan error, 1)
	go func() {
		err := sc.fault(fctx, e, l, res.Fault)
		l.began.Store(math.MaxInt32) // a fault script that ended holds no gate
		faultDone <- err
	}()
	l.run(ctx)
	res.LoadSeconds = round(time.Since(l.startedAt).Seconds())
	ferr := <-faultDone
	cancel()
	if ferr != nil {
		res.addError(fmt.Errorf("fault: %w", ferr))
	}
	res.Attempted, res.Acknowledged = l.started.Load(), l.acked.Load()
	res.Rejected, res.Indeterminate, res.Retries = l.rejected.Load(), l.indeterminate.Load(), l.retries.Load()
	res.ServerErrors, res.Rejections, res.ServerSample = l.serverErrors.Load(), l.rejectionSummary(), l.serverErrorSample()
	res.AckedByKind = l.kindCounts()
	res.HungAttempts = l.hung.Load()
	res.Latency.P50, res.Latency.P99, res.Latency.Max = l.latencies()
	res.Latency.SlowAttempt = round(float64(l.maxAttempt.Load()) / float64(time.Millisecond))
	lap("load")
	if ctx.Err() != nil {
		res.addError(ctx.Err())
		return res
	}

	settleStart := time.Now()
	if err := e.heal(ctx); err != nil {
		res.addError(err)
	}
	if err := e.settle(ctx); err != nil {
		res.addError(err)
	}
	res.SettleSeconds = round(time.Since(settleStart).Seconds())
	lap("settle")
	if err := e.measure(ctx, res, l); err != nil {
		res.addError(err)
	}
	lap("measure")
	if err := e.verifyRebuild(ctx, res); err != nil {
		res.addError(err)
	}
	lap("fresh_rebuild")
	res.Converged = res.Checksums.Write != "" && res.Checksums.Write == res.Checksums.Catalog && res.Checksums.Write == res.Checksums.Rebuild
	res.UnexpectedExits = append(e.products.unexpectedExits(), e.catalog.unexpectedExits()...)
	return res
}

// settle waits until every committed event is published and the catalog
// equals the write model.
func (e *env) settle(ctx context.Context) error {
	var last string
	err := poll(ctx, e.s.p.settle, "the catalog to match the write model", func() bool {
		if n := outboxPending(ctx, e.products.base); n != 0 {
			last = fmt.Sprintf("outbox pending %d", n)
			return false
		}
		w, err := writeModel(ctx, e.s.pg.url(e.dbs["products"]))
		if err != nil {
			last = err.Error()
			return false
		}
		c, err := catalogModel(ctx, e.catalog.base)
		if err != nil {
			last = err.Error()
			return false
		}
		if checksum(w) != checksum(c) {
			last = fmt.Sprintf("write model %d products, catalog %d", len(w), len(c))
			return false
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("%w (last: %s)", err, last)
	}
	return nil
}

// measure counts what happened to every command and event.
func (e *env) measure(ctx context.Context, res *result, l *load) error {
	var errs []error
	productsDB, catalogDB := e.s.pg.url(e.dbs["products"]), e.s.pg.url(e.dbs["catalog"])
	hist, err := readHistory(ctx, productsDB)
	if err != nil {
		return err
	}
	res.HistoryRows = int64(len(hist))
	a, err := drainAudit(ctx, e.amqpURL)
	if err != nil {
		errs = append(errs, err)
	}
	res.EventsPublished, res.DeliveriesPublished = int64(len(a.ids)), a.deliveries
	res.DuplicatesPublished = a.deliveries - int64(len(a.ids))
	res.UnknownEvents += a.noID
	if st, err := getStatus(ctx, e.catalog.base); err != nil {
		errs = append(errs, err)
	} else {
		res.EventsApplied["catalog"] = st.Applied
	}
	res.DeadLettered = queueDepth(e.amqpURL, "catalog.dead")
	res.Unroutable = queueDepth(e.amqpURL, "events.unroutable")
	if res.DuplicatesApplied, res.VersionRegressions, res.ReadModelWrites, err = appliedTwice(ctx, catalogDB); err != nil {
		errs = append(errs, err)
	}
	write, err := writeModel(ctx, productsDB)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	res.Checksums.Write = checksum(write)
	cat, err := catalogModel(ctx, e.catalog.base)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	res.Checksums.Catalog = checksum(cat)
	catVersion := make(map[string]int64, len(cat))
	for _, r := range cat {
		catVersion[r.ID] = r.Version
	}

	inHistory := make(map[string]bool, len(hist))
	byKey := map[string][]historyRow{}
	cmds := l.index()
	for _, h := range hist {
		inHistory[h.eventID] = true
		byKey[h.correlationID] = append(byKey[h.correlationID], h)
		if a.ids[h.eventID] == 0 {
			res.Unpublished++
		}
		if c := cmds[h.correlationID]; c == nil || (c.outcome != outcomeAcked && c.outcome != outcomeIndeterminate) {
			res.PhantomWrites++
		}
	}
	for id := range a.ids {
		if !inHistory[id] {
			res.UnknownEvents++
		}
	}
	for i := range l.cmds {
		c := &l.cmds[i]
		if c.outcome != outcomeAcked {
			continue
		}
		rows := byKey[c.key]
		made := 1 // the most history rows this command makes
		if c.kind == kindCreate && c.amount > 0 {
			made = 2 // create, then add_inventory, in one transaction
		}
		if len(rows) > made {
			res.DoubleExecuted++
		}
		why := ""
		switch {
		case len(rows) == 0 && c.kind != kindDiscontinue:
			why = "no history row"
		case catVersion[c.id] < c.version:
			why = fmt.Sprintf("catalog has version %d, the answer said %d", catVersion[c.id], c.version)
		}
		for _, h := range rows {
			switch {
			case why != "":
			case a.ids[h.eventID] == 0:
				why = "event " + h.eventID + " never published"
			case catVersion[h.entityID] < h.version:
				why = fmt.Sprintf("event %s (version %d) not in the catalog (version %d)", h.eventID, h.version, catVersion[h.entityID])
			}
		}
		if why != "" {
			res.Lost++
			if len(res.LostSample) < 5 {
				res.LostSample = append(res.LostSample, fmt.Sprintf("%s %s %s: %s", c.key, c.kind, c.id, why))
			}
		}
	}
	return errors.Join(errs...)
}

// verifyRebuild fills a new catalog, with a database and queues of its
// own, from a replay of the whole history, and checksums it.
func (e *env) verifyRebuild(ctx context.Context, res *result) error {
	v, err := e.newService("verify", "catalog", "verify", map[string]string{"CATALOG_NAME": "verify"})
	if err != nil {
		return err
	}
	defer v.close()
	if err := v.start(ctx); err != nil {
		return fmt.Errorf("fresh rebuild: %w", err)
	}
	if err := waitRebuilt(ctx, v.base, e.s.p.settle); err != nil {
		return fmt.Errorf("fresh rebuild: %w", err)
	}
	rows, err := catalogModel(ctx, v.base)
	if err != nil {
		return fmt.Errorf("fresh rebuild: %w", err)
	}
	res.Checksums.Rebuild = checksum(rows)
	return nil
}
