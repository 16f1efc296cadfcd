package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/pgstore"
)

// result is what one successful attempt published.
type result struct {
	count, expected int64
	cursor          string // the token in replay_completed
	took            time.Duration
}

// runRequest claims request id, runs it with retries while a heartbeat
// keeps the claim, and records the outcome.
func (r *Responder) runRequest(ctx context.Context, id string) {
	j, ok, err := r.claim(ctx, id)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("replay: claim failed; the sweep retries", "replay_id", id, "err", err)
		}
		return
	}
	if !ok {
		return // another worker has it, or it is finished
	}
	log := r.log.With("replay_id", j.ReplayID, "prefix", j.Prefix, "entity_type", j.EntityType, "mode", j.Mode)
	r.metrics.running.Inc()
	defer r.metrics.running.Dec()

	jobCtx, cancel := context.WithCancelCause(ctx)
	beating := make(chan struct{})
	go func() {
		defer close(beating)
		r.heartbeat(jobCtx, cancel, j)
	}()
	began := time.Now()
	res, err := r.attempts(jobCtx, j, log)
	lost := errors.Is(err, errLostClaim) || errors.Is(context.Cause(jobCtx), errLostClaim)
	cancel(nil)
	<-beating

	// The outcome is written even while stopping: a short grace on a
	// context of its own.
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer wcancel()
	switch {
	case lost:
		log.Warn("replay: another responder took this replay over; stopped publishing it", "err", err)
	case err == nil:
		r.metrics.replays.WithLabelValues(string(StatusDone)).Inc()
		r.metrics.duration.Observe(res.took.Seconds())
		rate := float64(res.count) / max(res.took.Seconds(), 1e-9)
		log.Info("replay done", "count", res.count, "duration", res.took.Round(time.Millisecond),
			"events_per_second", int64(rate), "waited", time.Since(began).Round(time.Millisecond))
		if res.count != res.expected {
			log.Warn("replay: count differs from expected_count", "count", res.count, "expected", res.expected)
		}
		if ferr := r.finish(wctx, j, StatusDone, res.count, ""); ferr != nil {
			// Left running: once its heartbeat is stale it is replayed again
			// from the pinned cursor, which consumers absorb.
			log.Error("replay: recording completion failed", "err", ferr)
		}
	case ctx.Err() != nil:
		log.Info("replay interrupted by shutdown; it resumes at the next start", "err", err)
		if rerr := r.release(wctx, j); rerr != nil {
			log.Warn("replay: handing the request back failed; it resumes once its heartbeat is stale", "err", rerr)
		}
	default:
		r.metrics.replays.WithLabelValues(string(StatusFailed)).Inc()
		log.Error("replay failed", "err", err)
		if ferr := r.finish(wctx, j, StatusFailed, res.count, err.Error()); ferr != nil {
			log.Error("replay: recording the failure failed", "err", ferr)
		}
	}
}

// heartbeat keeps the claim fresh until ctx ends; when the claim is lost it
// cancels the replay.
func (r *Responder) heartbeat(ctx context.Context, cancel context.CancelCauseFunc, j job) {
	t := time.NewTicker(r.cfg.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			err := r.beat(ctx, j)
			if errors.Is(err, errLostClaim) {
				cancel(errLostClaim)
				return
			}
			if err != nil && ctx.Err() == nil {
				r.log.Warn("replay: heartbeat failed", "replay_id", j.ReplayID, "err", err)
			}
		}
	}
}

// attempts runs the replay until it succeeds, fails permanently, runs out
// of attempts, or ctx ends.
func (r *Responder) attempts(ctx context.Context, j job, log *slog.Logger) (result, error) {
	for attempt := 1; ; attempt++ {
		res, err := r.replayOnce(ctx, &j)
		if err == nil || ctx.Err() != nil || permanent(err) || attempt >= r.cfg.MaxAttempts {
			return res, err
		}
		wait := backoff(attempt, time.Second, 30*time.Second)
		log.Warn("replay attempt failed; retrying", "attempt", attempt, "in", wait, "err", err)
		if !sleep(ctx, wait) {
			return res, err
		}
	}
}

// permanent reports an error that a retry cannot fix: PostgreSQL refusing
// the statement itself (bad data, bad SQL), or a lost claim.
func permanent(err error) bool {
	if errors.Is(err, errLostClaim) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		class := pgErr.Code[:2]
		return class == "22" || class == "42"
	}
	return false
}

const historyColumns = `event_id, sequence, entity_type, entity_id, version, event, from_state, to_state,
	attributes, occurred_at, correlation_id`

// queries returns the count and the select of a replay under the filter.
// full: every transition of the entity type, by sequence. latest: the newest
// transition of each entity, by sequence. after excludes what the cursor's
// snapshot saw; pinned (a resumed replay) keeps only what the first
// attempt's snapshot saw.
func queries(j job, after string) (count, rows string, args []any) {
	conds := []string{"entity_type = $1"}
	args = []any{j.EntityType}
	if after != "" {
		args = append(args, after)
		conds = append(conds, fmt.Sprintf("NOT pg_visible_in_snapshot(transaction_id, $%d::text::pg_snapshot)", len(args)))
	}
	if j.pinned != "" {
		args = append(args, j.pinned)
		conds = append(conds, fmt.Sprintf("pg_visible_in_snapshot(transaction_id, $%d::text::pg_snapshot)", len(args)))
	}
	where := " WHERE " + strings.Join(conds, " AND ")
	if j.Mode == Latest {
		count = `SELECT count(DISTINCT entity_id) FROM history` + where
		rows = `SELECT ` + historyColumns + ` FROM (
			SELECT DISTINCT ON (entity_id) ` + historyColumns + ` FROM history` + where + `
			ORDER BY entity_id, version DESC) latest ORDER BY sequence`
		return count, rows, args
	}
	count = `SELECT count(*) FROM history` + where
	rows = `SELECT ` + historyColumns + ` FROM history` + where + ` ORDER BY sequence`
	return count, rows, args
}

// replayOnce is one attempt: one read-only REPEATABLE READ snapshot, whose
// rows are streamed (pgx reads them as they are consumed, so memory stays
// bounded) and published with pipelined confirms between the two markers.
func (r *Responder) replayOnce(ctx context.Context, j *job) (res result, err error) {
	began := time.Now()
	pub, err := r.publisher()
	if err != nil {
		return res, err
	}
	defer pub.Close()

	// READ ONLY: the transaction never takes an xid, so a long replay does
	// not hold back pg_snapshot_xmin (and with it the outbox relay).
	tx, err := r.cfg.Pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return res, fmt.Errorf("replay: begin snapshot: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit a no-op
	var snapshot string
	if err := tx.QueryRow(ctx, `SELECT pg_current_snapshot()::text`).Scan(&snapshot); err != nil {
		return res, fmt.Errorf("replay: take snapshot: %w", err)
	}
	resumed := j.pinned != ""
	if !resumed {
		// Pinned before anything is published: a later attempt must send
		// the same set, not a larger one.
		j.pinned = snapshot
	}
	if err := r.beginAttempt(ctx, *j, Cursor{Snapshot: j.pinned}.String()); err != nil {
		if !resumed {
			j.pinned = ""
		}
		return res, err
	}
	res.cursor = Cursor{Snapshot: j.pinned}.String()
	filtered := *j
	if !resumed {
		filtered.pinned = "" // the snapshot itself is the filter
	}

	var after string
	if j.After != "" {
		c, err := ParseCursor(j.After)
		if err != nil {
			return res, fmt.Errorf("replay: after: %w", err)
		}
		after = c.Snapshot
	}
	countSQL, rowsSQL, args := queries(filtered, after)
	if err := tx.QueryRow(ctx, countSQL, args...).Scan(&res.expected); err != nil {
		return res, fmt.Errorf("replay: count: %w", err)
	}

	exchange := r.cfg.Topology.EventsExchange
	if err := r.publishMarker(ctx, pub, *j, StartedEvent, Started{ReplayID: j.ReplayID, ExpectedCount: res.expected}); err != nil {
		return res, err
	}
	rows, err := tx.Query(ctx, rowsSQL, args...)
	if err != nil {
		return res, fmt.Errorf("replay: query history: %w", err)
	}
	defer rows.Close()
	// The metric is counted in steps (a labelled counter per event would
	// cost more than the JSON) and settled whatever the outcome.
	counted := int64(0)
	events := r.metrics.events.WithLabelValues(j.EntityType)
	defer func() { events.Add(float64(res.count - counted)) }()
	for rows.Next() {
		e, err := pgstore.ScanEvent(rows)
		if err != nil {
			return res, fmt.Errorf("replay: scan history: %w", err)
		}
		msg, err := eventPublishing(e, j.ReplayID)
		if err != nil {
			return res, err
		}
		if err := pub.Publish(ctx, exchange, envelope.ReplayRoutingKey(j.Prefix, e.EntityType, e.Event), msg); err != nil {
			return res, fmt.Errorf("replay: publish %s: %w", e.ID, err)
		}
		res.count++
		if res.count-counted == 1024 {
			events.Add(1024)
			counted = res.count
		}
	}
	if err := rows.Err(); err != nil {
		return res, fmt.Errorf("replay: read history: %w", err)
	}
	// The snapshot is no longer needed: end it before waiting on the broker.
	if err := tx.Commit(ctx); err != nil {
		return res, fmt.Errorf("replay: end snapshot: %w", err)
	}
	if err := pub.Wait(ctx); err != nil {
		return res, fmt.Errorf("replay: confirm events: %w", err)
	}
	if err := r.publishMarker(ctx, pub, *j, CompletedEvent, Completed{ReplayID: j.ReplayID, Count: res.count, Cursor: res.cursor}); err != nil {
		return res, err
	}
	if err := pub.Wait(ctx); err != nil {
		return res, fmt.Errorf("replay: confirm %s: %w", CompletedEvent, err)
	}
	res.took = time.Since(began)
	return res, nil
}

// eventPublishing is the replayed message of e: the same body, message id
// and headers as the live one (pgstore.Message through broker.Marshaler),
// plus replay_id.
func eventPublishing(e envelope.Event, replayID string) (amqp091.Publishing, error) {
	body, err := json.Marshal(e)
	if err != nil {
		return amqp091.Publishing{}, fmt.Errorf("replay: marshal %s: %w", e.ID, err)
	}
	p := amqp091.Publishing{
		Headers: amqp091.Table{
			envelope.HeaderCorrelationID: e.CorrelationID,
			envelope.HeaderSchemaVersion: strconv.Itoa(e.SchemaVersion),
			envelope.HeaderReplayID:      replayID,
		},
		Body: body,
	}
	broker.SetMessageProperties(&p, e.ID, e.CorrelationID)
	return p, nil
}

func (r *Responder) publishMarker(ctx context.Context, pub *broker.ConfirmPublisher, j job, event string, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("replay: marshal %s: %w", event, err)
	}
	p := amqp091.Publishing{Headers: amqp091.Table{envelope.HeaderReplayID: j.ReplayID}, Body: body, Type: event}
	broker.SetMessageProperties(&p, uuid.Must(uuid.NewV7()).String(), j.ReplayID)
	if err := pub.Publish(ctx, r.cfg.Topology.EventsExchange, envelope.ReplayRoutingKey(j.Prefix, j.EntityType, event), p); err != nil {
		return fmt.Errorf("replay: publish %s: %w", event, err)
	}
	return nil
}

// publisher opens a confirming channel for one replay attempt on the
// responder's publishing connection, dialling it when needed. Publishing
// has a connection of its own: RabbitMQ blocks a publishing connection
// under flow control, which must not stall the request consumer.
func (r *Responder) publisher() (*broker.ConfirmPublisher, error) {
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	if r.pubConn == nil || r.pubConn.IsClosed() {
		conn, err := dial(r.cfg.AMQPURL, "replay-publisher")
		if err != nil {
			return nil, err
		}
		r.pubConn = conn
	}
	return broker.NewConfirmPublisher(broker.WrapAMQP(r.pubConn), r.cfg.Window)
}

func (r *Responder) closePublisherConn() {
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	if r.pubConn != nil {
		_ = r.pubConn.Close()
		r.pubConn = nil
	}
}
