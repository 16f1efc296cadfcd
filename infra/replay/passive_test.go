package replay_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// errorLog is a slog handler that keeps the "err" attribute of every
// record.
type errorLog struct {
	mu   sync.Mutex
	errs []string
}

func (h *errorLog) Enabled(context.Context, slog.Level) bool { return true }
func (h *errorLog) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *errorLog) WithGroup(string) slog.Handler            { return h }

func (h *errorLog) Handle(_ context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "err" {
			h.mu.Lock()
			h.errs = append(h.errs, a.Value.String())
			h.mu.Unlock()
		}
		return true
	})
	return nil
}

func (h *errorLog) has(subs ...string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.errs {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(e, s)
		}
		if all {
			return true
		}
	}
	return false
}

// TestPassiveResponderUsesTheDefinitions runs a Responder with
// Topology.Passive, as the products user of rabbitmq/definitions.json does
// (no configure permission): while its queues are missing it names the
// missing one and the definitions file and declares nothing; once they
// exist it consumes through the definitions' binding (it binds nothing
// itself), and a request that can never run is dead-lettered by the
// definitions' queue arguments.
func TestPassiveResponderUsesTheDefinitions(t *testing.T) {
	onEachBroker(t, testPassiveResponderUsesTheDefinitions)
}

func testPassiveResponderUsesTheDefinitions(t *testing.T, e *env) {
	dead := e.queue + ".dead"
	logs := &errorLog{}
	r, err := replay.NewResponder(e.config(func(c *replay.Config) {
		c.Topology.Passive = true
		c.Logger = slog.New(logs)
	}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30s of cancellation")
		}
	})
	missing := func(name string) bool {
		t.Helper()
		c := e.channelNoCleanup(t)
		defer c.Close()
		_, err := broker.CheckQueue(c, name)
		var me *broker.MissingError
		if err != nil && !errors.As(err, &me) {
			t.Fatalf("check %s: %v", name, err)
		}
		return err != nil
	}
	defs := e.channel(t) // the definitions file, step by step
	for _, step := range []struct {
		missing string
		then    func() error
	}{
		{dead, func() error {
			_, err := defs.QueueDeclare(dead, true, false, false, false, nil)
			return err
		}},
		{e.queue, func() error {
			// Unbound for now: the responder must not bind it.
			_, err := defs.QueueDeclare(e.queue, true, false, false, false, amqp091.Table{
				"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
			return err
		}},
	} {
		eventually(t, waitLong, "the responder reports queue "+step.missing+" missing", func() bool {
			return logs.has(`queue "`+step.missing+`" does not exist`, "rabbitmq/definitions.json")
		})
		select {
		case <-r.Ready():
			t.Fatalf("the responder consumes without %s", step.missing)
		default:
		}
		if !missing(step.missing) {
			t.Fatalf("the passive responder declared %s", step.missing)
		}
		if err := step.then(); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-r.Ready():
	case <-time.After(waitLong):
		t.Fatal("the responder does not consume once its queues exist")
	}

	// Nothing bound the request queue: a mandatory request comes back.
	ch := e.channel(t)
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	returns := ch.NotifyReturn(make(chan amqp091.Return, 1))
	if _, err := ch.Publish(testCtx(t), e.topo.CommandsExchange, replay.RequestRoutingKey, true,
		amqp091.Publishing{ContentType: "application/json", Body: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-returns:
	case <-time.After(waitLong):
		t.Fatal("a request reached the request queue: the passive responder bound it")
	}

	if err := defs.QueueBind(e.queue, replay.RequestRoutingKey, e.topo.CommandsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	obs := e.observe(t, envelope.ReplayBinding("defs", "widget"))
	e.commit(t, e.newWidget(t), 2)
	id := uuid.NewString()
	e.publishRequest(t, `not json`)
	e.publishRequest(t, `{"replay_id":"`+id+`","prefix":"defs","entity_type":"widget"}`)
	if got := obs.collect(t, id); got.completed.Count != 2 {
		t.Fatalf("count %d, want 2", got.completed.Count)
	}
	eventually(t, waitLong, "the undecodable request in "+dead, func() bool {
		c := e.channelNoCleanup(t)
		defer c.Close()
		q, err := broker.CheckQueue(c, dead)
		return err == nil && q.Messages == 1
	})
}

// channelNoCleanup opens a channel for one check, which closes it (a
// failed passive declare closes it too).
func (e *env) channelNoCleanup(t testing.TB) broker.Channel {
	t.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}
