package brokertest

import (
	"strconv"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

var messageCases = []testCase{
	{"PropertiesRoundTrip", testProperties},
	{"ConfirmsAcked", testConfirms},
}

// testProperties: what a consumer receives is what was published, as
// amqp091 decodes it off the wire (int as int32, timestamps in whole
// seconds), plus the delivery's own fields.
func testProperties(t *testing.T, e *env) {
	x := e.exchange("events", amqp091.ExchangeTopic, nil)
	q := e.queue("q", nil)
	e.bind(q, "order.#", x)
	sent := time.Date(2026, 11, 28, 10, 0, 0, 123456000, time.UTC)
	headerTime := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	pub := amqp091.Publishing{
		Headers: amqp091.Table{
			"correlation_id": "corr-1",
			"schema_version": int64(1),
			"replay":         true,
			"small":          int32(7),
			"int":            5,
			"ratio":          1.5,
			"at":             headerTime,
			"nested":         amqp091.Table{"k": "v"},
			"list":           []any{"a", int64(2)},
		},
		ContentType:     "application/json",
		ContentEncoding: "identity",
		DeliveryMode:    amqp091.Persistent,
		Priority:        3,
		CorrelationId:   "corr-1",
		ReplyTo:         "replies",
		MessageId:       "0190c0de-0000-7000-8000-000000000001",
		Timestamp:       sent,
		Type:            "order.create",
		AppId:           "brokertest",
		Body:            []byte(`{"id":"1"}`),
	}
	ch := e.confirmChannel()
	confirmed(t, publish(t, ch, x, "order.create", false, pub))
	d := receive(t, consume(t, e.channel(), q, "props"), 1)[0]

	for k, want := range map[string]any{
		"correlation_id": "corr-1", "schema_version": int64(1), "replay": true, "small": int32(7),
		"int": int32(5), "ratio": 1.5,
	} {
		if got := d.Headers[k]; got != want {
			t.Errorf("header %s = %#v (%T), want %#v (%T)", k, got, got, want, want)
		}
	}
	if got, ok := d.Headers["at"].(time.Time); !ok || !got.Equal(headerTime) {
		t.Errorf("header at = %#v, want %v", d.Headers["at"], headerTime)
	}
	if got, ok := d.Headers["nested"].(amqp091.Table); !ok || got["k"] != "v" {
		t.Errorf("header nested = %#v", d.Headers["nested"])
	}
	if got, ok := d.Headers["list"].([]any); !ok || len(got) != 2 || got[0] != "a" || got[1] != int64(2) {
		t.Errorf("header list = %#v", d.Headers["list"])
	}
	checks := []struct {
		field     string
		got, want any
	}{
		{"ContentType", d.ContentType, pub.ContentType},
		{"ContentEncoding", d.ContentEncoding, pub.ContentEncoding},
		{"DeliveryMode", d.DeliveryMode, pub.DeliveryMode},
		{"Priority", d.Priority, pub.Priority},
		{"CorrelationId", d.CorrelationId, pub.CorrelationId},
		{"ReplyTo", d.ReplyTo, pub.ReplyTo},
		{"MessageId", d.MessageId, pub.MessageId},
		{"Type", d.Type, pub.Type},
		{"AppId", d.AppId, pub.AppId},
		{"Body", string(d.Body), string(pub.Body)},
		{"Exchange", d.Exchange, x},
		{"RoutingKey", d.RoutingKey, "order.create"},
		{"ConsumerTag", d.ConsumerTag, "props"},
		{"DeliveryTag", d.DeliveryTag, uint64(1)},
		{"Redelivered", d.Redelivered, false},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %#v, want %#v", c.field, c.got, c.want)
		}
	}
	if !d.Timestamp.Equal(sent.Truncate(time.Second)) {
		t.Errorf("Timestamp = %v, want %v (AMQP keeps seconds)", d.Timestamp, sent.Truncate(time.Second))
	}
	if d.Acknowledger == nil {
		t.Fatal("delivery without an Acknowledger")
	}
	if err := d.Ack(false); err != nil {
		t.Fatalf("ack through the delivery: %v", err)
	}
	e.awaitReady(q, 0)
}

// testConfirms: in confirm mode every publish is acked, routed or not, and
// an acked message is already in its queue.
func testConfirms(t *testing.T, e *env) {
	x := e.exchange("x", amqp091.ExchangeDirect, nil)
	q := e.queue("q", nil)
	e.bind(q, "k", x)
	ch := e.confirmChannel()
	const n = 100
	var cs []broker.Confirmation
	for i := range n {
		cs = append(cs, publish(t, ch, x, "k", false, msg(strconv.Itoa(i))))
	}
	cs = append(cs, publish(t, ch, x, "unrouted", false, msg("u")))
	confirmed(t, cs...)
	if ready, _ := e.counts(q); ready != n {
		t.Fatalf("%d messages ready once all were confirmed, want %d", ready, n)
	}
	plain := e.channel()
	if c := publish(t, plain, x, "k", false, msg("plain")); c == nil {
		t.Fatal("publish without confirm mode returned no confirmation")
	} else {
		confirmed(t, c)
	}
}
