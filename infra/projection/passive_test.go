package projection_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/sandbox"
)

// logRecords is a slog handler that keeps every record as one line of
// text: the message and its attributes, errors unquoted.
type logRecords struct {
	mu    sync.Mutex
	lines []string
}

func (h *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecords) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logRecords) WithGroup(string) slog.Handler            { return h }

func (h *logRecords) Handle(_ context.Context, r slog.Record) error {
	line := r.Message
	r.Attrs(func(a slog.Attr) bool {
		line += " " + a.Key + "=" + a.Value.String()
		return true
	})
	h.mu.Lock()
	h.lines = append(h.lines, line)
	h.mu.Unlock()
	return nil
}

// find returns the first line that contains every one of subs.
func (h *logRecords) find(subs ...string) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.lines {
		ok := true
		for _, s := range subs {
			ok = ok && strings.Contains(l, s)
		}
		if ok {
			return l, true
		}
	}
	return "", false
}

func (h *logRecords) last() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.lines) == 0 {
		return "(no log)"
	}
	return h.lines[len(h.lines)-1]
}

// TestPassiveWorkerUsesTheDefinitions runs a worker with Topology.Passive,
// as a user without configure permission would (AMQP_DECLARE=passive):
// while its queues are missing it says which one and that the definitions
// file must be loaded, and declares nothing; once they exist it consumes
// through the bindings the definitions made, makes none itself, and
// rebuilds (purging N.replay without redeclaring it).
func TestPassiveWorkerUsesTheDefinitions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	name := sandbox.Name("w")
	live, rq, dead := name+".live", name+".replay", name+".dead"
	sandbox.DeleteLater(t, []string{live, rq, dead}, []string{dead})
	topo := e.topo
	topo.Passive = true
	logs := &logRecords{}
	proj := newWidgets()
	w, err := projection.NewWorker(projection.Config{
		Name: name, EntityTypes: []string{"widget"}, Projection: proj,
		Pool: openPool(t, e.dbURL, 3), AMQPURL: e.amqpURL, Topology: topo,
		RebuildTimeout: waitFor, Logger: slog.New(logs), Registerer: prometheus.NewRegistry(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after a stop", err)
			}
		case <-time.After(waitFor):
			t.Errorf("Run did not return within %s of a stop", waitFor)
		}
	})

	ch, err := e.conn.Channel() // the definitions file, step by step
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	exists := func(kind, name string) bool {
		t.Helper()
		c, err := e.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if kind == "exchange" {
			err = broker.CheckExchange(c, name)
		} else {
			_, err = broker.CheckQueue(c, name)
		}
		var me *broker.MissingError
		if err != nil && !errors.As(err, &me) {
			t.Fatalf("check %s %s: %v", kind, name, err)
		}
		return err == nil
	}
	// Each missing object in turn: the worker names it, waits, and creates
	// nothing.
	for _, step := range []struct {
		kind, missing string
		then          func() error
	}{
		{"queue", live, func() error {
			_, err := ch.QueueDeclare(live, true, false, false, false, amqp091.Table{"x-dead-letter-exchange": dead})
			return err
		}},
		{"exchange", dead, func() error {
			return ch.ExchangeDeclare(dead, amqp091.ExchangeFanout, true, false, false, false, nil)
		}},
		{"queue", dead, func() error {
			if _, err := ch.QueueDeclare(dead, true, false, false, false, nil); err != nil {
				return err
			}
			return ch.QueueBind(dead, "", dead, false, nil)
		}},
		{"queue", rq, func() error {
			if _, err := ch.QueueDeclare(rq, true, false, false, false, amqp091.Table{"x-dead-letter-exchange": dead}); err != nil {
				return err
			}
			return ch.QueueBind(rq, envelope.ReplayBinding(name, "widget"), e.topo.EventsExchange, false, nil)
		}},
	} {
		want := fmt.Sprintf("%s %q does not exist", step.kind, step.missing)
		eventually(t, waitFor, "the worker reports "+want, func() string {
			if _, ok := logs.find(want, "rabbitmq/definitions.json"); !ok {
				return "last log: " + logs.last()
			}
			return ""
		})
		select {
		case <-w.Ready():
			t.Fatalf("the worker is ready without %s %s", step.kind, step.missing)
		default:
		}
		if exists(step.kind, step.missing) {
			t.Fatalf("the passive worker declared %s %s", step.kind, step.missing)
		}
		if err := step.then(); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-w.Ready():
	case <-time.After(waitFor):
		t.Fatalf("the worker is not ready within %s once its queues exist; last log: %s", waitFor, logs.last())
	}
	tw := &testWorker{Worker: w, name: name, schema: name, proj: proj}

	// N.live is not bound yet (the definitions above left it out): the
	// worker bound nothing, so a live event goes to the alternate exchange.
	a := widgetHistory("a", 1)
	e.publishLive(t, a...)
	eventually(t, waitFor, "the unbound event in "+e.topo.UnroutableQueue(), func() string {
		if n := e.queueDepth(t, e.topo.UnroutableQueue()); n != 1 {
			return fmt.Sprintf("%d messages", n)
		}
		return ""
	})
	if got := e.model(t, tw); len(got) != 0 {
		t.Fatalf("the model holds %v, but N.live was never bound", got)
	}

	if err := ch.QueueBind(live, envelope.LiveBinding("widget"), e.topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	b := widgetHistory("b", 2)
	e.publishLive(t, b...)
	e.waitModel(t, tw, expect(b))

	// A rebuild purges N.replay (leftovers of an earlier replay go) and
	// consumes the replay through the definitions' binding.
	e.publish(t, replayMsgs(name, "00000000-0000-7000-8000-000000000000", widgetHistory("stale", 1)...)...)
	eventually(t, waitFor, "the leftover in "+rq, func() string {
		if n := e.queueDepth(t, rq); n != 1 {
			return fmt.Sprintf("%d messages", n)
		}
		return ""
	})
	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatalf("Rebuild: %v", err)
	}
	req := e.nextRequest(t)
	if req.ReplayID != id || req.Prefix != name {
		t.Fatalf("request %+v, want replay %s under prefix %s", req, id, name)
	}
	history := append(widgetHistory("a", 1), widgetHistory("b", 3)...)
	e.serveReplay(t, req, history, cursor(1))
	eventually(t, waitFor, "the rebuild completes", func() string {
		if st := tw.status(t); st.Rebuild.State != projection.RebuildCompleted || st.Rebuild.ReplayID != id {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
	e.waitModel(t, tw, expect(history))
	if n := w.StaleDroppedForTest(); n != 0 {
		t.Errorf("%d leftovers of the earlier replay reached the rebuild: N.replay was not purged", n)
	}
}
