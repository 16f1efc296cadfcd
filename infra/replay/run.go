package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
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
		if err == nil || ctx.Err() != nil || r.permanent(err) || attempt >= r.cfg.MaxAttempts {
			return res, err
		}
		wait := backoff(attempt, time.Second, 30*time.Second)
		log.Warn("replay attempt failed; retrying", "attempt", attempt, "in", wait, "err", err)
		if !sleep(ctx, wait) {
			return res, err
		}
	}
}

// permanent reports an error that a retry cannot fix: the store refusing
// the statement itself (bad data, bad SQL), a cursor of another store, or a
// lost claim.
func (r *Responder) permanent(err error) bool {
	return errors.Is(err, errLostClaim) || errors.Is(err, errForeignCursor) || r.history.permanent(err)
}

// replayOnce is one attempt: one consistent read of the history (on
// PostgreSQL a read-only REPEATABLE READ snapshot, on SQLite a read bounded
// by a sequence), whose rows are streamed in bounded memory and published
// with pipelined confirms between the two markers, one event per message or
// up to j.Batch.
func (r *Responder) replayOnce(ctx context.Context, j *job) (res result, err error) {
	began := time.Now()
	pub, err := r.publisher()
	if err != nil {
		return res, err
	}
	defer pub.Close()

	var after *Cursor
	if j.After != "" {
		c, err := ParseCursor(j.After)
		if err != nil {
			return res, fmt.Errorf("replay: after: %w", err)
		}
		after = &c
	}
	read, err := r.history.open(ctx, *j, after)
	if err != nil {
		return res, err
	}
	defer read.close()
	resumed := j.pinned != nil
	if !resumed {
		// Pinned before anything is published: a later attempt must send
		// the same set, not a larger one.
		c := read.cursor()
		j.pinned = &c
	}
	if err := r.beginAttempt(ctx, *j, j.pinned.String()); err != nil {
		if !resumed {
			j.pinned = nil
		}
		return res, err
	}
	res.cursor = j.pinned.String()
	if res.expected, err = read.count(ctx); err != nil {
		return res, err
	}

	exchange := r.cfg.Topology.EventsExchange
	if err := r.publishMarker(ctx, pub, *j, StartedEvent, Started{ReplayID: j.ReplayID, ExpectedCount: res.expected}); err != nil {
		return res, err
	}
	// The metric is counted in steps (a labelled counter per event would
	// cost more than the JSON) and settled whatever the outcome.
	counted := int64(0)
	events := r.metrics.events.WithLabelValues(j.EntityType)
	defer func() { events.Add(float64(res.count - counted)) }()
	batch := make([]envelope.Event, 0, max(j.Batch, 1))
	publish := func() error {
		if len(batch) == 0 {
			return nil
		}
		var msg amqp091.Publishing
		var key string
		var err error
		if j.Batch > 1 {
			msg, err = batchPublishing(batch, j.ReplayID)
			key = envelope.ReplayRoutingKey(j.Prefix, j.EntityType, BatchEvent)
		} else {
			msg, err = eventPublishing(batch[0], j.ReplayID)
			key = envelope.ReplayRoutingKey(j.Prefix, batch[0].EntityType, batch[0].Event)
		}
		if err != nil {
			return err
		}
		if err := pub.Publish(ctx, exchange, key, msg); err != nil {
			return fmt.Errorf("replay: publish %s: %w", msg.MessageId, err)
		}
		res.count += int64(len(batch))
		batch = batch[:0]
		if res.count-counted >= 1024 {
			events.Add(float64(res.count - counted))
			counted = res.count
		}
		return nil
	}
	for e, err := range read.events(ctx) {
		if err != nil {
			return res, err
		}
		if batch = append(batch, e); len(batch) == cap(batch) {
			if err := publish(); err != nil {
				return res, err
			}
		}
	}
	if err := publish(); err != nil {
		return res, err
	}
	// The read is no longer needed: end it before waiting on the broker.
	if err := read.end(ctx); err != nil {
		return res, err
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

// batchPublishing is one message of a batched replay: the events as a JSON
// array, a message id of its own (each event keeps its id in the body), and
// the replay's headers.
func batchPublishing(es []envelope.Event, replayID string) (amqp091.Publishing, error) {
	body, err := envelope.EncodeBatch(es)
	if err != nil {
		return amqp091.Publishing{}, fmt.Errorf("replay: marshal a batch from %s: %w", es[0].ID, err)
	}
	p := amqp091.Publishing{
		Headers: amqp091.Table{
			envelope.HeaderSchemaVersion: strconv.Itoa(envelope.SchemaVersion),
			envelope.HeaderReplayID:      replayID,
		},
		Body: body,
		Type: BatchEvent,
	}
	broker.SetMessageProperties(&p, uuid.Must(uuid.NewV7()).String(), replayID)
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
		conn, err := r.cfg.Dial("replay-publisher")
		if err != nil {
			return nil, fmt.Errorf("replay: connect to the broker: %w", err)
		}
		r.pubConn = conn
	}
	return broker.NewConfirmPublisher(r.pubConn, r.cfg.Window)
}

func (r *Responder) closePublisherConn() {
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	if r.pubConn != nil {
		_ = r.pubConn.Close()
		r.pubConn = nil
	}
}
