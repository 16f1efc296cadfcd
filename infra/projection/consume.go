package projection

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// errDeliveriesClosed means the channel or connection of a consumer closed.
var errDeliveriesClosed = errors.New("projection: deliveries closed")

// batching is how one consumer takes its queue: the prefetch, the most
// deliveries in a batch, and how long a batch waits for more after its
// first one.
type batching struct {
	prefetch, size int
	delay          time.Duration
}

// liveBatching serves N.live, where a batch's wait is latency.
func (c Config) liveBatching() batching {
	return batching{prefetch: c.Prefetch, size: c.BatchSize, delay: c.BatchDelay}
}

// replayBatching serves N.replay, where only throughput counts. Its sizes
// are in events; a replay message carries up to ReplayEventsPerMessage.
func (c Config) replayBatching() batching {
	messages := func(events int) int { return max(1, (events+c.ReplayEventsPerMessage-1)/c.ReplayEventsPerMessage) }
	return batching{prefetch: messages(c.ReplayPrefetch), size: messages(c.ReplayBatchSize), delay: c.ReplayBatchDelay}
}

// consumeLoop collects deliveries into batches of up to b.size, waiting at
// most b.delay after the first one, and hands each batch to handle. It
// returns nil when ctx is done (after the batch in flight) and
// errDeliveriesClosed when the channel closes.
func (w *Worker) consumeLoop(ctx context.Context, ch broker.Channel, deliveries <-chan amqp091.Delivery, b batching,
	handle func(context.Context, broker.Channel, []amqp091.Delivery)) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		var batch []amqp091.Delivery
		select {
		case <-ctx.Done():
			return nil
		case d, ok := <-deliveries:
			if !ok {
				return errDeliveriesClosed
			}
			batch = append(make([]amqp091.Delivery, 0, b.size), d)
		}
		open := true
		timer.Reset(b.delay)
	fill:
		for len(batch) < b.size {
			select {
			case d, ok := <-deliveries:
				if !ok {
					open = false
					break fill
				}
				batch = append(batch, d)
			case <-timer.C:
				break fill
			}
		}
		timer.Stop()
		if open && !ch.IsClosed() { // else the broker redelivers them anyway
			handle(ctx, ch, batch)
		}
		if !open {
			return errDeliveriesClosed
		}
	}
}

// item is a decoded delivery.
type item struct {
	d   amqp091.Delivery
	e   envelope.Event
	t   *track // replay only
	why error  // why the projection refused it (poisoned items)
}

// handleLive applies a batch from N.live to the active generation (and to
// the shadow while a rebuild runs).
func (w *Worker) handleLive(ctx context.Context, ch broker.Channel, batch []amqp091.Delivery) {
	start := time.Now()
	items := make([]item, 0, len(batch))
	for _, d := range batch {
		e, err := envelope.Decode(d.Body)
		if err == nil && replay.Reserved(e.Event) {
			err = fmt.Errorf("replay protocol name %q on the live queue", e.Event)
		}
		if err != nil {
			w.deadLetter(ch, d, err)
			continue
		}
		items = append(items, item{d: d, e: e})
	}
	w.setPending(items)
	defer w.pendingSince.Store(0)

	applied, poisoned, done := w.applyAll(ctx, ch, items, "live batch", w.store.applyLive)
	for _, it := range poisoned {
		w.deadLetter(ch, it.d, it.why)
	}
	w.ack(ch, deliveriesOf(applied), done)
	w.m.appliedLive.Add(float64(len(applied)))
	w.m.batchLive.Observe(time.Since(start).Seconds())
}

// handleReplay applies a batch from N.replay: events of r's replays to r's
// target generation, markers to r's progress; deliveries of other replays
// are stale and dropped.
func (w *Worker) handleReplay(ctx context.Context, ch broker.Channel, r *run, source string, batch []amqp091.Delivery) {
	start := time.Now()
	var items []item
	var settled []amqp091.Delivery // acked without applying: markers, stale
	for _, d := range batch {
		if marker := markerOf(d.RoutingKey); marker != "" {
			if err := w.handleMarker(r, marker, d); err != nil {
				w.deadLetter(ch, d, err)
				continue
			}
			settled = append(settled, d)
			continue
		}
		id := headerString(d.Headers, envelope.HeaderReplayID)
		t := r.track(id)
		if t == nil {
			w.staleDropped.Add(1)
			w.log.Debug("dropped a replayed event of another replay", "replay_id", id, "message_id", d.MessageId)
			settled = append(settled, d)
			continue
		}
		if isBatch(d.RoutingKey) {
			es, err := decodeBatch(d.Body)
			if err != nil {
				// Its events cannot be counted, so the run could only time
				// out: it fails now.
				w.deadLetter(ch, d, err)
				r.abort(fmt.Errorf("a malformed batch of replay %s: %w", id, err))
				continue
			}
			for _, e := range es {
				items = append(items, item{d: d, e: e, t: t})
			}
			continue
		}
		e, err := envelope.Decode(d.Body)
		if err == nil && replay.Reserved(e.Event) {
			err = fmt.Errorf("replay protocol name %q as an event", e.Event)
		}
		if err != nil {
			w.deadLetter(ch, d, err)
			r.see(t, cmp.Or(d.MessageId, e.ID)) // received, though poison
			continue
		}
		items = append(items, item{d: d, e: e, t: t})
	}

	gone := false
	applied, poisoned, done := w.applyAll(ctx, ch, items, "replay batch", func(ctx context.Context, events []envelope.Event) error {
		err := w.store.applyReplay(ctx, r, source, events)
		if errors.Is(err, errRunGone) {
			gone = true // swapped in or given up meanwhile: drop what is left
			return nil
		}
		return err
	})
	// A batch message with a poisoned event goes to N.dead whole (the
	// others of it are applied, harmlessly): one message, one outcome.
	settledTag := map[uint64]bool{}
	for _, it := range poisoned {
		if !settledTag[it.d.DeliveryTag] {
			settledTag[it.d.DeliveryTag] = true
			w.deadLetter(ch, it.d, it.why)
		}
		r.see(it.t, it.e.ID)
	}
	if !gone {
		for _, it := range applied {
			r.see(it.t, it.e.ID)
		}
		w.m.appliedReplay.Add(float64(len(applied)))
	}
	// A message is acked once, when every event of it is applied.
	unapplied := map[uint64]int{}
	for _, it := range items {
		unapplied[it.d.DeliveryTag]++
	}
	for _, it := range applied {
		unapplied[it.d.DeliveryTag]--
	}
	acked := settled
	for _, it := range applied {
		if tag := it.d.DeliveryTag; unapplied[tag] == 0 && !settledTag[tag] {
			settledTag[tag] = true
			acked = append(acked, it.d)
		}
	}
	w.ack(ch, acked, done)
	w.m.batchReplay.Observe(time.Since(start).Seconds())
	r.checkComplete()
}

// handleMarker records a replay_started or replay_completed marker of one of
// r's replays; markers of other replays are ignored. An error means the
// marker is malformed.
func (w *Worker) handleMarker(r *run, marker string, d amqp091.Delivery) error {
	var m struct {
		ReplayID      string `json:"replay_id"`
		ExpectedCount *int64 `json:"expected_count"`
		Count         *int64 `json:"count"`
		Cursor        string `json:"cursor"`
	}
	if err := json.Unmarshal(d.Body, &m); err != nil {
		return fmt.Errorf("malformed %s marker: %w", marker, err)
	}
	id := cmp.Or(m.ReplayID, headerString(d.Headers, envelope.HeaderReplayID))
	t := r.track(id)
	if t == nil {
		w.staleDropped.Add(1)
		return nil
	}
	switch marker {
	case replay.StartedEvent:
		if m.ExpectedCount == nil || *m.ExpectedCount < 0 {
			return errors.New("replay_started marker without expected_count")
		}
		r.markStarted(t, *m.ExpectedCount)
	case replay.CompletedEvent:
		if m.Count == nil || *m.Count < 0 {
			return errors.New("replay_completed marker without count")
		}
		r.markCompleted(t, *m.Count, m.Cursor)
		w.log.Info("replay completed by its producer", "replay_id", id, "count", *m.Count)
	}
	return nil
}

// markerOf returns the marker name a routing key ends with, or "".
func markerOf(routingKey string) string {
	for _, m := range []string{replay.StartedEvent, replay.CompletedEvent} {
		if strings.HasSuffix(routingKey, "."+m) {
			return m
		}
	}
	return ""
}

// isBatch reports a routing key of a replay_batch message.
func isBatch(routingKey string) bool { return strings.HasSuffix(routingKey, "."+replay.BatchEvent) }

// decodeBatch decodes a replay_batch message; an event named like the
// replay protocol makes the whole batch malformed.
func decodeBatch(body []byte) ([]envelope.Event, error) {
	es, err := envelope.DecodeBatch(body)
	if err != nil {
		return nil, err
	}
	for _, e := range es {
		if replay.Reserved(e.Event) {
			return nil, fmt.Errorf("replay protocol name %q as an event", e.Event)
		}
	}
	return es, nil
}

// applyAll applies items in one transaction (retrying transient failures).
// When the projection refuses the batch, it bisects it to find the events it
// refuses (poisoned) and applies the others. done is false when it stopped
// early (the worker is stopping, or the channel closed): the items that are
// neither applied nor poisoned stay unacknowledged.
func (w *Worker) applyAll(ctx context.Context, ch broker.Channel, items []item, what string,
	apply func(context.Context, []envelope.Event) error) (applied, poisoned []item, done bool) {
	if len(items) == 0 {
		return nil, nil, true
	}
	events := batchEvents(items)
	err := retry(ctx, w, what, ch.IsClosed, func(ctx context.Context) error { return apply(ctx, events) })
	switch {
	case err == nil:
		return items, nil, true
	case errors.Is(err, errStopped):
		return nil, nil, false
	case len(items) == 1 || len(events) == 1:
		for i := range items {
			items[i].why = err
		}
		return nil, items, true
	}
	mid := len(items) / 2
	a1, p1, ok := w.applyAll(ctx, ch, items[:mid], what, apply)
	if !ok {
		return a1, p1, false
	}
	a2, p2, ok := w.applyAll(ctx, ch, items[mid:], what, apply)
	// a1 and p1 may be views of items: append to fresh slices.
	return slices.Concat(a1, a2), slices.Concat(p1, p2), ok
}

// batchEvents returns the events of items without repeats of an event id
// (a duplicate delivery), in (entity type, entity id, version) order, so
// concurrent batches lock read-model rows in the same order.
func batchEvents(items []item) []envelope.Event {
	seen := make(map[string]struct{}, len(items))
	events := make([]envelope.Event, 0, len(items))
	for _, it := range items {
		if _, dup := seen[it.e.ID]; dup {
			continue
		}
		seen[it.e.ID] = struct{}{}
		events = append(events, it.e)
	}
	slices.SortStableFunc(events, func(a, b envelope.Event) int {
		return cmp.Or(cmp.Compare(a.EntityType, b.EntityType), cmp.Compare(a.EntityID, b.EntityID), cmp.Compare(a.Version, b.Version))
	})
	return events
}

func deliveriesOf(items []item) []amqp091.Delivery {
	ds := make([]amqp091.Delivery, len(items))
	for i, it := range items {
		ds[i] = it.d
	}
	return ds
}

// ack acknowledges ds, all delivered on ch. When the whole batch is
// settled (every other delivery of it was nacked before), one ack with
// multiple=true of the highest tag covers them; otherwise each is acked.
// A failed ack (the channel closed) is harmless: the broker redelivers and
// the version check absorbs the repeat.
func (w *Worker) ack(ch broker.Channel, ds []amqp091.Delivery, batchSettled bool) {
	if len(ds) == 0 {
		return
	}
	if batchSettled {
		var top uint64
		for _, d := range ds {
			top = max(top, d.DeliveryTag)
		}
		if err := ch.Ack(top, true); err != nil {
			w.log.Debug("ack failed; the broker will redeliver", "err", err)
		}
		return
	}
	for _, d := range ds {
		if err := ch.Ack(d.DeliveryTag, false); err != nil {
			w.log.Debug("ack failed; the broker will redeliver", "err", err)
			return
		}
	}
}

// deadLetter rejects d without requeueing: the queue's dead-letter exchange
// routes it to N.dead.
func (w *Worker) deadLetter(ch broker.Channel, d amqp091.Delivery, reason error) {
	if err := ch.Nack(d.DeliveryTag, false, false); err != nil {
		w.log.Warn("dead-lettering failed; the broker will redeliver", "message_id", d.MessageId, "err", err)
		return
	}
	w.deadLettered.Add(1)
	w.m.deadLettered.Inc()
	w.log.Error("message dead-lettered", "queue", w.deadQueue(), "routing_key", d.RoutingKey,
		"message_id", d.MessageId, "reason", reason)
}

// setPending records the oldest occurred_at of the live events being applied.
func (w *Worker) setPending(items []item) {
	var oldest time.Time
	for _, it := range items {
		if oldest.IsZero() || it.e.OccurredAt.Before(oldest) {
			oldest = it.e.OccurredAt
		}
	}
	if len(items) > 0 && oldest.IsZero() {
		oldest = time.Now()
	}
	if !oldest.IsZero() {
		w.pendingSince.Store(oldest.UnixNano())
	}
}

// headerString reads a header as a string whatever its AMQP type: decoding
// never fails on a header (x-death is a table, and producers may send
// numbers).
func headerString(h amqp091.Table, key string) string {
	switch v := h[key].(type) {
	case nil:
		return ""
	case string:
		return v
	case []byte:
		return string(v)
	default:
		return fmt.Sprint(v)
	}
}

// eventKey is the compact key of an event id in a replay's distinct set:
// the UUID's 16 bytes, or a hash of an id that is not a UUID.
func eventKey(id string) [16]byte {
	if u, err := uuid.Parse(id); err == nil {
		return u
	}
	h := sha256.Sum256([]byte(id))
	return [16]byte(h[:16])
}

// pgCode is the SQLSTATE of err, or "".
func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}
