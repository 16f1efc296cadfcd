package projection

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// MemoryProjection is a read model held in memory by a View: there is no
// durable state, so instead of generations and rebuild locks the view
// empties it and fills it again from a latest replay whenever it
// (re)connects.
//
// The view calls both methods from one goroutine, never concurrently; the
// projection guards its own state against its readers.
type MemoryProjection interface {
	// Reset forgets everything. The view calls it each time it starts
	// consuming (at start and after every reconnect), just before it asks
	// for a latest replay that brings the newest state of every entity.
	Reset()
	// Apply applies events, live and replayed mixed, in the order they
	// arrived. It must be idempotent and order-tolerant: an event whose
	// version is not newer than what the model holds for its entity changes
	// nothing (duplicates are normal: at-least-once delivery, and a replay
	// overlaps the live stream).
	Apply(events []envelope.Event)
}

// Defaults of ViewConfig.
const (
	DefaultQueueExpires  = 60 * time.Second
	DefaultViewPrefetch  = 200
	DefaultReplayTimeout = time.Minute
)

// ViewConfig configures a View.
type ViewConfig struct {
	// Prefix names the view's one queue and is the prefix its replays come
	// under. It must be unique to the process (InstancePrefix makes one,
	// such as "ui-7f3a09c1"), match ^[a-z][a-z0-9-]{0,39}$, and not be an
	// entity type or a word the routing scheme uses.
	Prefix string
	// EntityTypes are the entity types the view consumes.
	EntityTypes []string
	// Projection is the read model.
	Projection MemoryProjection
	// AMQPURL is the broker.
	AMQPURL string
	// Dial opens the view's broker connection, and again after it is lost;
	// default broker.AMQPDialer(AMQPURL). The embedded mode passes the
	// in-process broker's.
	Dial broker.Dialer
	// Topology names the shared exchanges (defaults filled in).
	Topology broker.Topology
	// QueueExpires is how long the queue outlives its last consumer (the
	// x-expires argument): long enough to ride out a broker blip, short
	// enough that a dead instance leaves nothing behind. Default 60s; at
	// least 1s.
	QueueExpires time.Duration
	// Prefetch is the consumer prefetch, and the largest batch handed to
	// Apply. Default 200.
	Prefetch int
	// ReplayTimeout is how long a latest replay may take before the view
	// asks for another one (the responder may have died mid-way). Default
	// 1 minute.
	ReplayTimeout time.Duration
	// ReplayEventsPerMessage is the most events the view asks the producer
	// to put in one replay message (replay.Request Batch); default 100, at
	// most replay.MaxBatch; 1 asks for one message per event.
	ReplayEventsPerMessage int
	// OnStatus, when set, is called with the new status whenever Connected,
	// Replaying or Ready changes. It runs on the view's goroutine and must
	// not block.
	OnStatus func(ViewStatus)
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (c ViewConfig) withDefaults() ViewConfig {
	c.Topology = c.Topology.WithDefaults()
	if c.Dial == nil && c.AMQPURL != "" {
		c.Dial = broker.AMQPDialer(c.AMQPURL)
	}
	if c.QueueExpires == 0 {
		c.QueueExpires = DefaultQueueExpires
	}
	if c.Prefetch == 0 {
		c.Prefetch = DefaultViewPrefetch
	}
	if c.ReplayTimeout == 0 {
		c.ReplayTimeout = DefaultReplayTimeout
	}
	if c.ReplayEventsPerMessage <= 0 {
		c.ReplayEventsPerMessage = DefaultReplayEventsPerMessage
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Validate reports what is missing or wrong, as an apperr.Invalid error with
// one message per field. Zero values that have defaults are fine.
func (c ViewConfig) Validate() error {
	c = c.withDefaults()
	f := apperr.Fields{}
	if len(c.EntityTypes) == 0 {
		f.Add("entity_types", "at least one entity type is needed")
	}
	for _, et := range c.EntityTypes {
		if !envelope.ValidName(et) {
			f.Add("entity_types", fmt.Sprintf("%q is not a valid entity type", et))
		}
	}
	if !namePattern.MatchString(c.Prefix) {
		f.Add("prefix", fmt.Sprintf("%q must match %s", c.Prefix, namePattern))
	} else if len(c.EntityTypes) > 0 {
		// Check the prefix the way the replay responder will.
		r := replay.Request{Prefix: c.Prefix, EntityType: c.EntityTypes[0]}
		if err := r.Normalize(c.EntityTypes); err != nil {
			var ae *apperr.Error
			if errors.As(err, &ae) && ae.Fields["prefix"] != "" {
				f.Add("prefix", ae.Fields["prefix"])
			}
		}
	}
	if c.Projection == nil {
		f.Add("projection", "is required")
	}
	if c.Dial == nil {
		f.Add("amqp_url", "is required (or Dial)")
	}
	if err := c.Topology.Validate(); err != nil {
		f.Add("topology", err.Error())
	}
	if c.QueueExpires < time.Second || c.QueueExpires.Milliseconds() > math.MaxInt32 {
		f.Add("queue_expires", "must be between 1s and about 24 days")
	}
	if c.Prefetch < 1 || c.Prefetch > math.MaxUint16 {
		f.Add("prefetch", "must be between 1 and 65535")
	}
	if c.ReplayTimeout < 0 {
		f.Add("replay_timeout", "must not be negative")
	}
	if c.ReplayEventsPerMessage > replay.MaxBatch {
		f.Add("replay_events_per_message", fmt.Sprintf("must be at most %d", replay.MaxBatch))
	}
	return f.Err()
}

// InstancePrefix returns base followed by a dash and 8 random hex digits,
// such as "ui-7f3a09c1": a view prefix unique to one process.
func InstancePrefix(base string) (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("projection: instance prefix: %w", err)
	}
	return base + "-" + hex.EncodeToString(b), nil
}

// ViewStatus is what a View reports about itself.
type ViewStatus struct {
	Prefix string `json:"prefix"`
	Queue  string `json:"queue"`
	// Connected: the view consumes its queue.
	Connected bool `json:"connected"`
	// Replaying: the model was reset and the latest replay that refills it
	// has not delivered all its events yet.
	Replaying bool `json:"replaying"`
	// Ready: connected and not replaying, so the model is complete.
	Ready bool `json:"ready"`
	// ReplayIDs are the current or last replay's ids, one per entity type.
	ReplayIDs []string `json:"replay_ids,omitempty"`
	Expected  int64    `json:"expected"` // expected_count, then the completed marker's count
	Received  int64    `json:"received"` // distinct events of the current replay received
	// Applied counts the events handed to Apply since the view started.
	Applied int64 `json:"applied"`
	// Dropped counts messages dropped without applying: undecodable ones
	// and replayed ones of replays that are not current.
	Dropped    int64 `json:"dropped"`
	Replays    int64 `json:"replays"`    // latest replays completed
	Reconnects int64 `json:"reconnects"` // sessions after the first
	// RequestsFailed counts replay requests that did not reach a responder
	// (none bound, or the broker refused them); they are asked again.
	RequestsFailed int64     `json:"requests_failed"`
	LastEventAt    time.Time `json:"last_event_at"`
}

// View keeps a MemoryProjection current from one broker queue that belongs
// to this process alone, named after Config.Prefix and bound to both the
// live events (`<entity>.#`) and the view's replays (`<prefix>.<entity>.#`).
// One queue serves the whole process: a service fans the model out to its
// own clients (browsers, say) in process, never with a queue per client.
//
// Each session (the first, and one after every lost connection or vanished
// queue) declares and binds the queue, starts consuming, resets the model,
// and asks for a latest replay: the newest transition of every entity, so a
// start costs O(entities), not O(history). Replayed events of that replay
// and live events are applied as they come (the model's version check
// merges them); replayed events of any other replay are dropped. The model
// is ready once the replay's completed marker has come and that many
// distinct events of the replay have arrived (the marker may overtake the
// last of them).
//
// It consumes through broker.Conn, like Worker: batches of what the
// prefetch holds are applied and acked at once.
type View struct {
	cfg ViewConfig
	log *slog.Logger

	ready     chan struct{}
	readyOnce sync.Once
	running   atomic.Bool

	applied    atomic.Int64
	dropped    atomic.Int64
	replays    atomic.Int64
	reconnects atomic.Int64
	reqFailed  atomic.Int64
	lastEvent  atomic.Int64 // unix nanos of the newest applied event's occurred_at

	refresh chan chan []string // Refresh's requests to the session; answered with the new replay ids

	mu        sync.Mutex
	connected bool
	cur       *viewReplay // the current replay; nil before the first session
	reported  ViewStatus  // last status passed to OnStatus
}

// viewReplay is one latest replay: one replay id per entity type. Only the
// view's goroutine changes it, under the mutex of View, which Status takes
// to read it.
type viewReplay struct {
	tracks  map[string]*track // by replay id
	ids     []string          // in EntityTypes order
	done    bool              // every track delivered its count
	started time.Time
}

// NewView validates c and fills in its defaults.
func NewView(c ViewConfig) (*View, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	c.EntityTypes = slices.Clone(c.EntityTypes)
	return &View{
		cfg:     c,
		log:     c.Logger.With("view", c.Prefix),
		ready:   make(chan struct{}),
		refresh: make(chan chan []string),
	}, nil
}

// Queue is the name of the view's queue: its prefix.
func (v *View) Queue() string { return v.cfg.Prefix }

// Ready is closed once the first latest replay is complete: from then on
// the model holds every entity (Status tells whether a later reconnect is
// refilling it).
func (v *View) Ready() <-chan struct{} { return v.ready }

// Status reports the view's connection, replay progress and counters.
func (v *View) Status() ViewStatus {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.statusLocked()
}

func (v *View) statusLocked() ViewStatus {
	st := ViewStatus{
		Prefix:     v.cfg.Prefix,
		Queue:      v.Queue(),
		Connected:  v.connected,
		Applied:    v.applied.Load(),
		Dropped:    v.dropped.Load(),
		Replays:    v.replays.Load(),
		Reconnects: v.reconnects.Load(),
	}
	st.RequestsFailed = v.reqFailed.Load()
	if n := v.lastEvent.Load(); n != 0 {
		st.LastEventAt = time.Unix(0, n).UTC()
	}
	if r := v.cur; r != nil {
		st.Replaying = !r.done
		st.ReplayIDs = slices.Clone(r.ids)
		for _, t := range r.tracks {
			if t.completed {
				st.Expected += t.count
			} else {
				st.Expected += t.expected
			}
			st.Received += int64(len(t.seen))
		}
	} else {
		st.Replaying = true // nothing asked yet: the model is not filled
	}
	st.Ready = st.Connected && !st.Replaying
	return st
}

// report calls OnStatus when the connection or replay state changed.
func (v *View) report() {
	v.mu.Lock()
	st := v.statusLocked()
	changed := st.Connected != v.reported.Connected || st.Replaying != v.reported.Replaying || st.Ready != v.reported.Ready
	if changed {
		v.reported = st
	}
	v.mu.Unlock()
	if changed && v.cfg.OnStatus != nil {
		v.cfg.OnStatus(st)
	}
}

// Run consumes until ctx is done, starting a new session with backoff
// whenever the connection is lost or the queue disappears. It returns nil
// when ctx is done, and an error only when it is already running.
func (v *View) Run(ctx context.Context) error {
	if !v.running.CompareAndSwap(false, true) {
		return errors.New("projection: View.Run is already running")
	}
	defer v.running.Store(false)
	b := backoff{min: 200 * time.Millisecond, max: 5 * time.Second}
	first := true
	for {
		consumed, err := v.session(ctx, first)
		if ctx.Err() != nil {
			return nil
		}
		if consumed {
			first = false
			b.reset()
			v.log.Warn("view: broker connection or queue lost; reconnecting and rebuilding", "err", err)
		} else {
			v.log.Warn("view: cannot consume from the broker; retrying", "err", err, "in", b.peek())
		}
		if !sleep(ctx, b.next()) {
			return nil
		}
	}
}

// session runs one connection: declare, consume, reset, replay, apply.
// consumed reports whether it got as far as consuming.
func (v *View) session(ctx context.Context, first bool) (consumed bool, err error) {
	conn, err := v.cfg.Dial("statemill view " + v.cfg.Prefix)
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	connClosed := conn.NotifyClose(make(chan *amqp091.Error, 1))

	if err := v.declare(conn); err != nil {
		return false, err
	}
	ch, err := conn.Channel()
	if err != nil {
		return false, fmt.Errorf("open channel: %w", err)
	}
	if err := ch.Qos(v.cfg.Prefetch, 0, false); err != nil {
		return false, fmt.Errorf("qos: %w", err)
	}
	// The broker cancels the consumer when the queue is deleted under it
	// (by an operator, or a policy): the session ends and the next one
	// declares it again.
	cancelled := ch.NotifyCancel(make(chan string, 1))
	chClosed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	// An exclusive consumer: the queue is this process's alone, and a
	// second consumer would take half of the events from the model.
	deliveries, err := ch.Consume(v.Queue(), "statemill-view-"+v.cfg.Prefix, false, true, false, false, nil)
	if err != nil {
		// A 404 here means the queue vanished between declare and consume.
		return false, fmt.Errorf("consume %s: %w", v.Queue(), err)
	}

	v.mu.Lock()
	v.connected = true
	v.mu.Unlock()
	defer func() {
		v.mu.Lock()
		v.connected = false
		v.mu.Unlock()
		v.report()
	}()
	if !first {
		v.reconnects.Add(1)
	}

	// The queue may be new (events published while it did not exist are
	// lost to it) or hold a backlog of unknown age: either way the model
	// starts over from a latest replay. The queue is bound and consumed
	// before the request goes out, because RabbitMQ drops what no binding
	// matches.
	v.cfg.Projection.Reset()
	v.newReplay()
	v.report()

	request := time.NewTimer(0)
	defer request.Stop()
	deadline := time.NewTimer(time.Hour)
	deadline.Stop()
	defer deadline.Stop()
	retry := backoff{min: 500 * time.Millisecond, max: 10 * time.Second}
	for {
		select {
		case <-ctx.Done():
			return true, nil
		case e := <-connClosed:
			return true, closeErr("connection", e)
		case e := <-chClosed:
			return true, closeErr("channel", e)
		case tag := <-cancelled:
			return true, fmt.Errorf("the broker cancelled consumer %s: queue %s is gone", tag, v.Queue())
		case <-request.C:
			if err := v.request(ctx, conn); err != nil {
				if ctx.Err() != nil {
					return true, nil
				}
				if conn.IsClosed() {
					return true, err
				}
				v.reqFailed.Add(1)
				d := retry.next()
				v.log.Warn("view: the replay request failed; asking again", "err", err, "in", d)
				request.Reset(d)
				continue
			}
			deadline.Reset(v.cfg.ReplayTimeout)
		case reply := <-v.refresh:
			// A rebuild: start over from a new latest replay, as a new
			// session does (the model is emptied, then refilled).
			v.cfg.Projection.Reset()
			v.newReplay()
			v.report()
			v.mu.Lock()
			reply <- slices.Clone(v.cur.ids)
			v.mu.Unlock()
			deadline.Stop()
			request.Reset(0)
		case <-deadline.C:
			if v.replayDone() {
				continue
			}
			st := v.Status()
			v.log.Warn("view: the latest replay did not complete in time; asking for another",
				"timeout", v.cfg.ReplayTimeout, "received", st.Received, "expected", st.Expected)
			// No reset: what arrived is correct (the version check), the
			// next replay only completes it.
			v.newReplay()
			v.report()
			request.Reset(0)
		case d, ok := <-deliveries:
			if !ok {
				return true, errDeliveriesClosed
			}
			batch := []amqp091.Delivery{d}
		fill: // take what the prefetch already holds, without waiting
			for len(batch) < v.cfg.Prefetch {
				select {
				case d, ok := <-deliveries:
					if !ok {
						break fill
					}
					batch = append(batch, d)
				default:
					break fill
				}
			}
			if v.handle(ch, batch) {
				deadline.Stop()
			}
		}
	}
}

func closeErr(what string, e *amqp091.Error) error {
	if e == nil {
		return fmt.Errorf("%s closed", what)
	}
	return fmt.Errorf("%s closed: %w", what, e)
}

// declare declares the shared exchanges (idempotently) and the view's queue
// with its bindings. With Topology.Passive the shared exchanges are only
// checked (the definitions file declares them), but the queue, which is
// the instance's own, is still declared and bound: its user needs configure
// permission on the queue's name only (the ui's is ^ui-[0-9a-f]{8}$ in
// rabbitmq/definitions.json).
//
// The queue is non-durable and not exclusive, and it expires (x-expires)
// once it has had no consumer for QueueExpires. Neither exclusive nor
// auto-delete does the job alone (watermill-notes §5): an exclusive queue
// vanishes with the connection that declared it, so any broker blip loses
// its backlog and a reconnect races its deletion; an auto-delete queue
// vanishes when its consumer is cancelled; and with client libraries whose
// reconnect loop re-declares the queue after the consumer has gone, such
// queues linger with no consumer (the orphan-queue bug). x-expires has the
// broker delete the queue after the instance is gone for good (stopped,
// killed, or partitioned away), so nothing leaks, while a short outage
// finds it still there.
func (v *View) declare(conn broker.Conn) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	defer ch.Close()
	t := v.cfg.Topology
	if err := broker.DeclareShared(ch, t); err != nil {
		return err
	}
	q := v.Queue()
	args := amqp091.Table{"x-expires": int32(v.cfg.QueueExpires.Milliseconds())}
	if _, err := ch.QueueDeclare(q, false, false, false, false, args); err != nil {
		return fmt.Errorf("declare queue %s: %w", q, err)
	}
	for _, et := range v.cfg.EntityTypes {
		for _, key := range []string{envelope.LiveBinding(et), envelope.ReplayBinding(v.cfg.Prefix, et)} {
			if err := ch.QueueBind(q, key, t.EventsExchange, false, nil); err != nil {
				return fmt.Errorf("bind %s to %s: %w", q, key, err)
			}
		}
	}
	return nil
}

// newReplay starts tracking a new latest replay (fresh replay ids): the
// events of earlier replays that are still on their way are dropped.
func (v *View) newReplay() {
	r := &viewReplay{tracks: make(map[string]*track, len(v.cfg.EntityTypes)), started: time.Now()}
	for _, et := range v.cfg.EntityTypes {
		id := uuid.Must(uuid.NewV7()).String()
		r.ids = append(r.ids, id)
		r.tracks[id] = &track{entityType: et, seen: map[[16]byte]struct{}{}}
	}
	v.mu.Lock()
	v.cur = r
	v.mu.Unlock()
}

// Refresh empties the model and fills it again from a new latest replay,
// while live events keep coming: the view's rebuild. It returns the new
// replay's id (ids joined by commas with several entity types), or
// apperr.Unavailable while the view is not connected.
func (v *View) Refresh(ctx context.Context) (string, error) {
	v.mu.Lock()
	connected := v.connected
	v.mu.Unlock()
	if !connected {
		return "", apperr.Errorf(apperr.Unavailable, "the view is not connected to the broker")
	}
	// Bounded: the session may end between the check and the hand-over.
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	reply := make(chan []string, 1)
	select {
	case v.refresh <- reply:
	case <-ctx.Done():
		return "", apperr.Wrap(apperr.Unavailable, ctx.Err(), "the view is not connected to the broker")
	}
	select {
	case ids := <-reply:
		return strings.Join(ids, ","), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (v *View) replayDone() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.cur != nil && v.cur.done
}

// request publishes the current replay's requests, one per entity type, to
// the commands exchange: persistent, mandatory (a request no responder's
// queue is bound for comes back, instead of vanishing) and confirmed.
func (v *View) request(ctx context.Context, conn broker.Conn) error {
	v.mu.Lock()
	ids := slices.Clone(v.cur.ids)
	v.mu.Unlock()

	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return fmt.Errorf("confirm mode: %w", err)
	}
	returns := ch.NotifyReturn(make(chan amqp091.Return, len(ids)))
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	confirms := make([]broker.Confirmation, 0, len(ids))
	for i, et := range v.cfg.EntityTypes {
		req := replay.Request{ReplayID: ids[i], Prefix: v.cfg.Prefix, EntityType: et, Mode: replay.Latest,
			Batch: v.cfg.ReplayEventsPerMessage}
		if err := req.Normalize(v.cfg.EntityTypes); err != nil {
			return fmt.Errorf("replay request: %w", err)
		}
		body, err := json.Marshal(req)
		if err != nil {
			return fmt.Errorf("replay request: %w", err)
		}
		p := amqp091.Publishing{Body: body}
		broker.SetMessageProperties(&p, req.ReplayID, req.ReplayID)
		p.Headers[envelope.HeaderCorrelationID] = req.ReplayID
		dc, err := ch.Publish(ctx, v.cfg.Topology.CommandsExchange, replay.RequestRoutingKey, true, p)
		if err != nil {
			return fmt.Errorf("publish the replay request: %w", err)
		}
		confirms = append(confirms, dc)
	}
	for _, dc := range confirms {
		ok, err := waitConfirm(ctx, dc)
		if err != nil {
			return fmt.Errorf("the broker did not confirm the replay request: %w", err)
		}
		if !ok {
			return errors.New("the broker refused the replay request")
		}
	}
	// A basic.return precedes the confirm of its message.
	select {
	case ret := <-returns:
		return fmt.Errorf("no replay responder is bound to %q on %s (%s)", ret.RoutingKey, ret.Exchange, ret.ReplyText)
	default:
	}
	v.log.Info("view: latest replay requested", "replay_ids", ids)
	return nil
}

// handle applies a batch and acks it. Replayed messages are those under the
// view's prefix: markers update the replay's progress, events of the
// current replay are applied, events of other replays are stale. It
// reports whether the current replay completed with this batch.
func (v *View) handle(ch broker.Channel, batch []amqp091.Delivery) (completed bool) {
	events := make([]envelope.Event, 0, len(batch))
	replayPrefix := v.cfg.Prefix + "."
	v.mu.Lock()
	r := v.cur
	v.mu.Unlock()
	for _, d := range batch {
		if !strings.HasPrefix(d.RoutingKey, replayPrefix) {
			e, err := envelope.Decode(d.Body)
			if err == nil && replay.Reserved(e.Event) {
				err = fmt.Errorf("replay protocol name %q on a live routing key", e.Event)
			}
			if err != nil {
				v.drop(d, err)
				continue
			}
			events = append(events, e)
			continue
		}
		id := headerString(d.Headers, envelope.HeaderReplayID)
		if marker := markerOf(d.RoutingKey); marker != "" {
			if err := v.marker(r, marker, id, d); err != nil {
				v.drop(d, err)
			}
			continue
		}
		v.mu.Lock()
		t := r.tracks[id]
		v.mu.Unlock()
		if t == nil {
			v.dropped.Add(1)
			v.log.Debug("view: dropped a replayed event of another replay", "replay_id", id, "message_id", d.MessageId)
			continue
		}
		if isBatch(d.RoutingKey) {
			es, err := decodeBatch(d.Body)
			if err != nil {
				// Its events cannot be counted: this replay will not
				// complete, and ReplayTimeout asks for another.
				v.drop(d, err)
				continue
			}
			v.mu.Lock()
			for _, e := range es {
				t.seen[eventKey(e.ID)] = struct{}{}
			}
			v.mu.Unlock()
			events = append(events, es...)
			continue
		}
		e, err := envelope.Decode(d.Body)
		if err == nil && replay.Reserved(e.Event) {
			err = fmt.Errorf("replay protocol name %q as an event", e.Event)
		}
		key := d.MessageId
		if err == nil {
			key = e.ID
		}
		if key != "" {
			// Received, even when it is garbage: the count still adds up.
			v.mu.Lock()
			t.seen[eventKey(key)] = struct{}{}
			v.mu.Unlock()
		}
		if err != nil {
			v.drop(d, err)
			continue
		}
		events = append(events, e)
	}

	if len(events) > 0 {
		v.cfg.Projection.Apply(events)
		v.applied.Add(int64(len(events)))
		newest := v.lastEvent.Load()
		for _, e := range events {
			newest = max(newest, e.OccurredAt.UnixNano())
		}
		v.lastEvent.Store(newest)
	}
	// Everything in the batch is settled (applied or dropped): one ack
	// covers it. A failed ack means the channel closed; the broker then
	// redelivers, and applying again changes nothing.
	if err := ch.Ack(batch[len(batch)-1].DeliveryTag, true); err != nil {
		v.log.Debug("view: ack failed; the broker will redeliver", "err", err)
	}
	completed = v.checkComplete(r)
	return completed
}

// drop logs and counts a message that is dropped without applying. There
// is no durable state to protect (the next replay restores the model), so
// garbage is acked rather than dead-lettered: it can never loop.
func (v *View) drop(d amqp091.Delivery, why error) {
	v.dropped.Add(1)
	v.log.Warn("view: message dropped", "routing_key", d.RoutingKey, "message_id", d.MessageId, "reason", why)
}

// marker records a replay_started or replay_completed marker of the current
// replay; markers of other replays are ignored. An error means the marker
// is malformed.
func (v *View) marker(r *viewReplay, marker, headerID string, d amqp091.Delivery) error {
	var m struct {
		ReplayID      string `json:"replay_id"`
		ExpectedCount *int64 `json:"expected_count"`
		Count         *int64 `json:"count"`
	}
	if err := json.Unmarshal(d.Body, &m); err != nil {
		return fmt.Errorf("malformed %s marker: %w", marker, err)
	}
	id := m.ReplayID
	if id == "" {
		id = headerID
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	t := r.tracks[id]
	if t == nil {
		v.dropped.Add(1)
		return nil
	}
	switch marker {
	case replay.StartedEvent:
		if m.ExpectedCount == nil || *m.ExpectedCount < 0 {
			return errors.New("replay_started marker without expected_count")
		}
		t.expected = *m.ExpectedCount
	case replay.CompletedEvent:
		if m.Count == nil || *m.Count < 0 {
			return errors.New("replay_completed marker without count")
		}
		t.count, t.completed = *m.Count, true
	}
	return nil
}

// checkComplete marks r done once every track's completed marker came and
// that many distinct events of it arrived; it reports whether it just did.
func (v *View) checkComplete(r *viewReplay) bool {
	v.mu.Lock()
	if r.done || v.cur != r {
		v.mu.Unlock()
		return false
	}
	var total int64
	for _, t := range r.tracks {
		if !t.completed || int64(len(t.seen)) < t.count {
			v.mu.Unlock()
			return false
		}
		total += t.count
	}
	r.done = true
	took := time.Since(r.started)
	v.mu.Unlock()
	v.replays.Add(1)
	v.readyOnce.Do(func() { close(v.ready) })
	v.log.Info("view: rebuilt from a latest replay", "replay_ids", r.ids, "events", total, "took", took.Round(time.Millisecond))
	v.report()
	return true
}
