package projection_test

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/sandbox"
)

// memWidgets is an in-memory read model: the newest version of each widget.
type memWidgets struct {
	mu      sync.Mutex
	rows    map[string]widget
	resets  int
	applied map[string]int // event id → times handed over
}

func newMemWidgets() *memWidgets {
	return &memWidgets{rows: map[string]widget{}, applied: map[string]int{}}
}

func (m *memWidgets) Reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rows = map[string]widget{}
	m.resets++
}

func (m *memWidgets) Apply(events []envelope.Event) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range events {
		m.applied[e.ID]++
		if cur, ok := m.rows[e.EntityID]; ok && cur.Version >= e.Version {
			continue
		}
		m.rows[e.EntityID] = widget{Version: e.Version, State: e.To}
	}
}

func (m *memWidgets) model() map[string]widget {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]widget, len(m.rows))
	for k, v := range m.rows {
		out[k] = v
	}
	return out
}

func (m *memWidgets) resetCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.resets
}

func (m *memWidgets) times(id string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.applied[id]
}

type testView struct {
	*projection.View
	prefix string
	proj   *memWidgets
	stop   func()

	mu       sync.Mutex
	statuses []projection.ViewStatus // what OnStatus reported
}

// startView runs a view with a fresh prefix on e until the test ends, and
// waits until it consumes (its first replay request has arrived).
func (e *env) startView(t testing.TB, opts ...func(*projection.ViewConfig)) (*testView, replay.Request) {
	t.Helper()
	prefix, err := projection.InstancePrefix("v")
	if err != nil {
		t.Fatal(err)
	}
	e.deleteLater(t, []string{prefix}, nil)
	tv := &testView{prefix: prefix, proj: newMemWidgets()}
	cfg := projection.ViewConfig{
		Prefix:      prefix,
		EntityTypes: []string{"widget"},
		Projection:  tv.proj,
		AMQPURL:     e.amqpURL,
		Dial:        e.dial,
		Topology:    e.topo,
		Logger:      testLogger(t),
		OnStatus: func(st projection.ViewStatus) {
			tv.mu.Lock()
			tv.statuses = append(tv.statuses, st)
			tv.mu.Unlock()
		},
	}
	for _, o := range opts {
		o(&cfg)
	}
	v, err := projection.NewView(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tv.View = v
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.Run(ctx) }()
	var once sync.Once
	tv.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("View.Run returned %v after a stop", err)
				}
			case <-time.After(waitFor):
				t.Errorf("View.Run did not return within %s of a stop", waitFor)
			}
		})
	}
	t.Cleanup(tv.stop)
	req := e.nextRequest(t)
	return tv, req
}

func (tv *testView) waitModel(t testing.TB, want map[string]widget) {
	t.Helper()
	eventually(t, waitFor, "the view's model converges", func() string { return sameModel(tv.proj.model(), want) })
}

func (tv *testView) waitReady(t testing.TB) projection.ViewStatus {
	t.Helper()
	var st projection.ViewStatus
	eventually(t, waitFor, "the view is ready", func() string {
		st = tv.Status()
		if !st.Ready || st.Replaying || !st.Connected {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	return st
}

func checkLatestRequest(t testing.TB, req replay.Request, prefix string) {
	t.Helper()
	if req.Prefix != prefix || req.EntityType != "widget" || req.Mode != replay.Latest || req.After != "" || req.ReplayID == "" ||
		req.Batch != projection.DefaultReplayEventsPerMessage {
		t.Fatalf("replay request %+v, want a batched latest replay of widget under %q", req, prefix)
	}
}

func TestViewConfigValidate(t *testing.T) {
	t.Parallel()
	good := projection.ViewConfig{
		Prefix: "ui-0a1b2c3d", EntityTypes: []string{"widget"}, Projection: newMemWidgets(), AMQPURL: "amqp://x",
	}
	if err := good.Validate(); err != nil {
		t.Fatalf("a good config: %v", err)
	}
	if _, err := projection.NewView(good); err != nil {
		t.Fatalf("NewView: %v", err)
	}
	for _, c := range []struct {
		field string
		edit  func(*projection.ViewConfig)
	}{
		{"prefix", func(c *projection.ViewConfig) { c.Prefix = "" }},
		{"prefix", func(c *projection.ViewConfig) { c.Prefix = "UI" }},
		{"prefix", func(c *projection.ViewConfig) { c.Prefix = "widget" }}, // an entity type: would route to live consumers
		{"prefix", func(c *projection.ViewConfig) { c.Prefix = "replay" }}, // a reserved word
		{"entity_types", func(c *projection.ViewConfig) { c.EntityTypes = nil }},
		{"entity_types", func(c *projection.ViewConfig) { c.EntityTypes = []string{"Widget.#"} }},
		{"projection", func(c *projection.ViewConfig) { c.Projection = nil }},
		{"amqp_url", func(c *projection.ViewConfig) { c.AMQPURL = "" }},
		{"queue_expires", func(c *projection.ViewConfig) { c.QueueExpires = time.Millisecond }},
		{"prefetch", func(c *projection.ViewConfig) { c.Prefetch = -1 }},
		{"replay_timeout", func(c *projection.ViewConfig) { c.ReplayTimeout = -time.Second }},
		{"replay_events_per_message", func(c *projection.ViewConfig) { c.ReplayEventsPerMessage = replay.MaxBatch + 1 }},
	} {
		cfg := good
		c.edit(&cfg)
		err := cfg.Validate()
		ae := apperr.As(err)
		if err == nil || ae.Code != apperr.Invalid || ae.Fields[c.field] == "" {
			t.Errorf("%s: Validate() = %v, want an Invalid error on %s", c.field, err, c.field)
		}
		if v, err := projection.NewView(cfg); err == nil || v != nil {
			t.Errorf("%s: NewView accepted a bad config", c.field)
		}
	}
	p, err := projection.InstancePrefix("ui")
	if err != nil || !regexp.MustCompile(`^ui-[0-9a-f]{8}$`).MatchString(p) {
		t.Fatalf("InstancePrefix = %q, %v", p, err)
	}
	if q, _ := projection.InstancePrefix("ui"); q == p {
		t.Fatalf("two instance prefixes are both %q", p)
	}
}

// A view declares one non-durable, non-exclusive queue that expires, asks
// for a latest replay once it consumes, applies only the current replay's
// events (the completed marker may overtake them), and then live events.
func TestViewRebuildsFromLatestReplayThenFollowsLive(t *testing.T) {
	onEachBroker(t, testViewRebuildsFromLatestReplayThenFollowsLive)
}

func testViewRebuildsFromLatestReplayThenFollowsLive(t *testing.T, e *env) {
	before := widgetHistory("lost", 2)
	e.publishLive(t, before...) // no queue yet: not for the view
	tv, req := e.startView(t)
	checkLatestRequest(t, req, tv.prefix)
	if tv.Queue() != tv.prefix {
		t.Fatalf("queue %q, want the prefix %q", tv.Queue(), tv.prefix)
	}
	st := tv.Status()
	if !st.Connected || !st.Replaying || st.Ready || tv.proj.resetCount() != 1 {
		t.Fatalf("while replaying: %+v resets=%d", st, tv.proj.resetCount())
	}
	select {
	case <-tv.Ready():
		t.Fatal("ready before the replay")
	default:
	}

	// The queue: equivalent to a non-durable, non-exclusive, not
	// auto-deleted queue with x-expires 60000 (another connection may
	// declare it so), and not to one without x-expires.
	declare := func(args amqp091.Table) error {
		ch, err := e.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		_, err = ch.QueueDeclare(tv.Queue(), false, false, false, false, args)
		return err
	}
	if err := declare(amqp091.Table{"x-expires": int32(60000)}); err != nil {
		t.Fatalf("the view's queue is not a plain queue with x-expires 60000: %v", err)
	}
	var ae *amqp091.Error
	if err := declare(nil); !errors.As(err, &ae) || ae.Code != amqp091.PreconditionFailed {
		t.Fatalf("declaring the view's queue without x-expires: %v, want PRECONDITION_FAILED", err)
	}

	// The latest replay: a stale replay's event (another id), the
	// completed marker before the last event, and a duplicate.
	latest := []envelope.Event{widgetHistory("a", 3)[2], widgetHistory("b", 1)[0], widgetHistory("lost", 2)[1]}
	stale := widgetEvent("stale", 1, false)
	// expected_count 5 in the started marker, count 3 in the completed
	// one: Expected tells which marker was handled last.
	msgs := []msg{startedMsg(tv.prefix, req.ReplayID, 5)}
	msgs = append(msgs, replayMsgs(tv.prefix, "0198f0c2-7d1e-7000-8000-00000000beef", stale)...)
	msgs = append(msgs, replayMsgs(tv.prefix, req.ReplayID, latest[:2]...)...)
	msgs = append(msgs, completedMsg(tv.prefix, req.ReplayID, 3, cursor(1)))
	e.publish(t, msgs...)
	eventually(t, waitFor, "the completed marker handled", func() string {
		if st := tv.Status(); st.Received != 2 || st.Expected != 3 || st.Dropped != 1 {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	if st := tv.Status(); st.Ready || !st.Replaying {
		t.Fatalf("complete after 2 of 3 events: %+v", st)
	}
	e.publish(t, replayMsgs(tv.prefix, req.ReplayID, latest[2], latest[0])...)
	select {
	case <-tv.Ready():
	case <-time.After(waitFor):
		t.Fatalf("not ready: %+v", tv.Status())
	}
	st = tv.waitReady(t)
	want := expect(latest)
	if diff := sameModel(tv.proj.model(), want); diff != "" {
		t.Fatalf("after the replay: %s", diff)
	}
	if st.Replays != 1 || st.Dropped != 1 || st.Received != 3 || st.Expected != 3 {
		t.Fatalf("status after the replay: %+v", st)
	}
	if tv.proj.times(stale.ID) != 0 {
		t.Fatal("an event of another replay was applied")
	}

	// Live events follow; garbage is dropped once and never loops.
	live := widgetHistory("c", 2)
	e.publish(t, msg{key: "widget.create", p: amqp091.Publishing{MessageId: "garbage", Body: []byte("{not json")}})
	e.publishLive(t, live...)
	e.publishLive(t, widgetHistory("a", 4)[3])
	want = expect(latest, live, widgetHistory("a", 4))
	tv.waitModel(t, want)
	eventually(t, waitFor, "the garbage dropped", func() string {
		if st := tv.Status(); st.Dropped != 2 {
			return fmt.Sprintf("dropped %d", st.Dropped)
		}
		return ""
	})
	if n := e.queueDepth(t, tv.Queue()); n != 0 {
		t.Fatalf("%d messages left in the view's queue", n)
	}
	tv.mu.Lock()
	statuses := tv.statuses
	tv.mu.Unlock()
	if len(statuses) < 2 || statuses[0].Ready || !statuses[len(statuses)-1].Ready {
		t.Fatalf("OnStatus reported %+v; want not ready, then ready", statuses)
	}
}

// When the queue disappears under the view (deleted, or expired during an
// outage) the view declares it again, resets the model and asks for a fresh
// latest replay.
func TestViewRebuildsWhenItsQueueIsGone(t *testing.T) {
	onEachBroker(t, testViewRebuildsWhenItsQueueIsGone)
}

func testViewRebuildsWhenItsQueueIsGone(t *testing.T, e *env) {
	tv, req := e.startView(t)
	first := widgetHistory("a", 2)
	e.serveReplay(t, req, first[1:], cursor(1))
	tv.waitReady(t)
	tv.waitModel(t, expect(first))

	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete(tv.Queue(), false, false, false); err != nil {
		t.Fatal(err)
	}
	_ = ch.Close()
	again := e.nextRequest(t)
	checkLatestRequest(t, again, tv.prefix)
	if again.ReplayID == req.ReplayID {
		t.Fatal("the second replay reuses the first replay id")
	}
	if n := tv.proj.resetCount(); n != 2 {
		t.Fatalf("%d resets, want 2", n)
	}
	// The old replay's leftovers are dropped, the new one applies.
	second := widgetHistory("b", 1)
	e.publish(t, replayMsgs(tv.prefix, req.ReplayID, widgetEvent("old", 1, false))...)
	e.serveReplay(t, again, []envelope.Event{first[1], second[0]}, cursor(2))
	st := tv.waitReady(t)
	tv.waitModel(t, expect(first, second))
	if st.Replays != 2 || st.Reconnects != 1 {
		t.Fatalf("after the second replay: %+v", st)
	}
}

// After the broker connection is lost, the view reconnects, resets and
// replays; what happened meanwhile is in the model.
func TestViewRebuildsAfterBrokerReconnect(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	proxy := sandbox.NewProxy(t, hostPort(t, e.amqpURL))
	tv, req := e.startView(t, func(c *projection.ViewConfig) { c.AMQPURL = withHost(t, e.amqpURL, proxy.Addr()) })
	a := widgetHistory("a", 1)
	e.serveReplay(t, req, a, cursor(1))
	tv.waitReady(t)

	proxy.Down()
	eventually(t, waitFor, "the view notices", func() string {
		if st := tv.Status(); st.Connected || st.Ready {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	during := widgetHistory("b", 2)
	e.publishLive(t, during...) // the queue outlives the outage (x-expires) and keeps these
	proxy.Up()
	again := e.nextRequest(t)
	checkLatestRequest(t, again, tv.prefix)
	all := expect(a, during)
	e.serveReplay(t, again, []envelope.Event{a[0], during[1]}, cursor(2))
	st := tv.waitReady(t)
	tv.waitModel(t, all)
	if st.Reconnects != 1 || st.Replays != 2 || tv.proj.resetCount() != 2 {
		t.Fatalf("after the reconnect: %+v resets=%d", st, tv.proj.resetCount())
	}
}

// A replay that does not complete in time is asked for again (no reset: what
// arrived stays); one that no responder is bound for is retried until one is.
func TestViewAsksAgain(t *testing.T) { onEachBroker(t, testViewAsksAgain) }

func testViewAsksAgain(t *testing.T, e *env) {
	tv, req := e.startView(t, func(c *projection.ViewConfig) { c.ReplayTimeout = 300 * time.Millisecond })
	partial := widgetHistory("a", 1)
	e.publish(t, startedMsg(tv.prefix, req.ReplayID, 2))
	e.publish(t, replayMsgs(tv.prefix, req.ReplayID, partial...)...)
	again := e.nextRequest(t)
	if again.ReplayID == req.ReplayID {
		t.Fatal("the second request reuses the replay id")
	}
	if n := tv.proj.resetCount(); n != 1 {
		t.Fatalf("%d resets, want 1", n)
	}
	b := widgetHistory("b", 1)
	e.serveReplay(t, again, append(partial, b...), cursor(1))
	tv.waitReady(t)
	tv.waitModel(t, expect(partial, b))

	// No responder bound: the mandatory request comes back, and the view
	// keeps asking until one is bound.
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	requestQueue := e.ns + ".replay_requests"
	if err := ch.QueueUnbind(requestQueue, replay.RequestRoutingKey, e.topo.CommandsExchange, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete(tv.Queue(), false, false, false); err != nil {
		t.Fatal(err)
	}
	eventually(t, waitFor, "a reconnect that cannot request", func() string {
		if st := tv.Status(); st.Reconnects != 1 || !st.Connected || !st.Replaying {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	eventually(t, waitFor, "a request came back", func() string {
		if st := tv.Status(); st.RequestsFailed < 1 {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	select {
	case r := <-e.requests:
		t.Fatalf("a request arrived while none was bound: %+v", r)
	default:
	}
	if err := ch.QueueBind(requestQueue, replay.RequestRoutingKey, e.topo.CommandsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	third := e.nextRequest(t)
	checkLatestRequest(t, third, tv.prefix)
	e.serveReplay(t, third, append(partial, b...), cursor(2))
	tv.waitReady(t)
	tv.waitModel(t, expect(partial, b))
}

// The queue disappears on its own once the instance is gone.
func TestViewQueueExpires(t *testing.T) { onEachBroker(t, testViewQueueExpires) }

func testViewQueueExpires(t *testing.T, e *env) {
	tv, _ := e.startView(t, func(c *projection.ViewConfig) { c.QueueExpires = time.Second })
	tv.stop()
	// Polled slowly: a declare, even a passive one, renews the queue's lease.
	deadline := time.Now().Add(waitFor)
	for {
		ch, err := e.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		_, err = ch.QueueDeclarePassive(tv.Queue(), false, false, false, false, nil)
		var ae *amqp091.Error
		if errors.As(err, &ae) && ae.Code == amqp091.NotFound {
			return
		}
		_ = ch.Close()
		if time.Now().After(deadline) {
			t.Fatalf("the queue did not expire within %s of the view's stop: %v", waitFor, err)
		}
		time.Sleep(2500 * time.Millisecond)
	}
}
