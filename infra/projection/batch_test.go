package projection_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/replay"
)

// A worker asks for batched replays. A batch whose event the projection
// refuses goes to N.dead whole (its other events applied), and the rebuild
// still completes; a batch that does not decode fails the rebuild at once
// (its events cannot be counted), long before the timeout.
func TestReplayBatches(t *testing.T) { onEachBroker(t, testReplayBatches) }

func testReplayBatches(t *testing.T, e *env) {
	w := e.startWorker(t, "", withTimeout(10*time.Minute))
	var history []envelope.Event
	for i := range 4 {
		history = append(history, widgetHistory(fmt.Sprintf("h%d", i), 2)...)
	}
	e.publishLive(t, history...)
	e.waitModel(t, w, expect(history))

	id, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	req := e.nextRequest(t)
	if req.ReplayID != id || req.Batch != projection.DefaultReplayEventsPerMessage {
		t.Fatalf("request %+v, want replay %s with batch %d", req, id, projection.DefaultReplayEventsPerMessage)
	}
	refused := widgetEvent("r", 1, true)
	sent := append(append([]envelope.Event(nil), history...), refused, widgetEvent("s", 1, false))
	// Batches of 3: the last one holds the refused event and "s".
	msgs := append([]msg{startedMsg(w.name, id, int64(len(sent)))}, batchMsgs(w.name, id, 3, sent...)...)
	e.publish(t, append(msgs, completedMsg(w.name, id, int64(len(sent)), cursor(9)))...)
	eventually(t, waitFor, "the rebuild completes", func() string {
		if st := w.status(t); st.Rebuild.State != projection.RebuildCompleted || st.ActiveGeneration != 2 {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	want := expect(history, []envelope.Event{widgetEvent("s", 1, false)})
	if msg := sameModel(e.model(t, w), want); msg != "" {
		t.Fatal(msg)
	}
	dead := e.drain(t, w.name+".dead", 1)
	if dead[0].RoutingKey != w.name+".widget."+replay.BatchEvent || !strings.Contains(string(dead[0].Body), refused.ID) {
		t.Fatalf("dead-lettered %q %s, want the batch with %s", dead[0].RoutingKey, dead[0].Body, refused.ID)
	}

	id2, err := w.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	e.nextRequest(t)
	e.publish(t, startedMsg(w.name, id2, 2), msg{key: envelope.ReplayRoutingKey(w.name, "widget", replay.BatchEvent),
		p: amqp091.Publishing{MessageId: "bad-batch", Headers: amqp091.Table{envelope.HeaderReplayID: id2}, Body: []byte(`[{"id":"x"}]`)}})
	eventually(t, waitFor, "the rebuild fails", func() string {
		st := w.status(t)
		if st.Rebuild.ReplayID != id2 || st.Rebuild.State != projection.RebuildFailed || !strings.Contains(st.Rebuild.Error, "malformed batch") ||
			st.ActiveGeneration != 2 {
			return fmt.Sprintf("active %d, %+v", st.ActiveGeneration, st.Rebuild)
		}
		return ""
	})
	if d := e.drain(t, w.name+".dead", 1); d[0].MessageId != "bad-batch" {
		t.Fatalf("dead-lettered %q, want bad-batch", d[0].MessageId)
	}
	if msg := sameModel(e.model(t, w), want); msg != "" {
		t.Fatalf("the live model changed: %s", msg)
	}
}

// N.replay is lazy (a batched replay grows it faster than a read model
// drains it, and a lazy queue keeps that on disk): redeclaring it with
// another mode is refused. One declared by an earlier version, without the
// mode, is used as it is, and a rebuild still completes.
func TestReplayQueueIsLazy(t *testing.T) { onEachBroker(t, testReplayQueueIsLazy) }

func testReplayQueueIsLazy(t *testing.T, e *env) {
	w := e.startWorker(t, "")
	redeclare := func(name, mode string) error {
		ch, err := e.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ch.Close() }()
		_, err = ch.QueueDeclare(name+".replay", true, false, false, false,
			amqp091.Table{"x-dead-letter-exchange": name + ".dead", "x-queue-mode": mode})
		return err
	}
	if err := redeclare(w.name, "lazy"); err != nil {
		t.Fatalf("redeclare N.replay as lazy: %v", err)
	}
	var amqpErr *amqp091.Error
	if err := redeclare(w.name, "default"); !errors.As(err, &amqpErr) || amqpErr.Code != amqp091.PreconditionFailed {
		t.Fatalf("redeclare N.replay with another mode: %v, want 406: it is not lazy", err)
	}

	// An earlier version's queue: the same name, no mode.
	old := "old-" + strings.ToLower(w.name[len(w.name)-8:])
	e.deleteLater(t, []string{old + ".live", old + ".replay", old + ".dead"}, []string{old + ".dead"})
	ch, err := e.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(old+".replay", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": old + ".dead"}); err != nil {
		t.Fatal(err)
	}
	_ = ch.Close()
	ow := e.startWorker(t, old)
	history := widgetHistory("a", 2)
	e.publishLive(t, history...)
	e.waitModel(t, ow, expect(history))
	id, err := ow.Rebuild(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	e.serveReplay(t, e.nextRequest(t), history, cursor(3))
	eventually(t, waitFor, "the rebuild on the old queue completes", func() string {
		if st := ow.status(t); st.Rebuild.ReplayID != id || st.Rebuild.State != projection.RebuildCompleted {
			return fmt.Sprintf("%+v", st.Rebuild)
		}
		return ""
	})
}
