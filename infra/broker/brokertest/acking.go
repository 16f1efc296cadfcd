package brokertest

import (
	"slices"
	"strconv"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

var ackingCases = []testCase{
	{"AckMultiple", testAckMultiple},
	{"NackRequeueRedeliversFirst", testNackRequeue},
	{"NackWithoutRequeueDeadLetters", testDeadLetter},
	{"DeadLetterRoutingKeyThroughDefaultExchange", testDeadLetterRoutingKey},
	{"RejectWithoutDeadLetterExchangeDrops", testRejectDrops},
	{"ChannelCloseRequeuesUnacked", testChannelCloseRequeues},
	{"ConnectionCloseRequeuesAndDropsExclusive", testConnectionClose},
	{"UnknownDeliveryTagClosesChannel", testUnknownTag},
}

func publishN(t *testing.T, e *env, queue string, n int) {
	t.Helper()
	pub := e.confirmChannel()
	var cs []broker.Confirmation
	for i := range n {
		cs = append(cs, publish(t, pub, "", queue, false, msg("m"+strconv.Itoa(i+1))))
	}
	confirmed(t, cs...)
}

// testAckMultiple: acking tag 3 with multiple settles 1..3; closing the
// channel then requeues only 4 and 5.
func testAckMultiple(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 5)
	ch := e.channel()
	ds := consume(t, ch, q, "c")
	got := receive(t, ds, 5)
	if err := ch.Ack(got[2].DeliveryTag, true); err != nil {
		t.Fatal(err)
	}
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	e.awaitReady(q, 2)
	again := consumeAuto(t, e.channel(), q)
	d := receive(t, again, 2)
	if got := ids(d); !slices.Equal(got, []string{"m4", "m5"}) {
		t.Fatalf("requeued %q, want [m4 m5]", got)
	}
	for _, x := range d {
		if !x.Redelivered {
			t.Errorf("%s not flagged redelivered", x.MessageId)
		}
	}
}

// testNackRequeue: a nacked message goes back to the head of the queue and
// comes again with Redelivered set, before the next one.
func testNackRequeue(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 2)
	ch := e.channel()
	if err := ch.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	ds := consume(t, ch, q, "c")
	first := receive(t, ds, 1)[0]
	if first.MessageId != "m1" || first.Redelivered {
		t.Fatalf("first delivery %q redelivered=%v, want m1 false", first.MessageId, first.Redelivered)
	}
	if err := first.Nack(false, true); err != nil {
		t.Fatal(err)
	}
	again := receive(t, ds, 1)[0]
	if again.MessageId != "m1" || !again.Redelivered {
		t.Fatalf("after nack got %q redelivered=%v, want m1 true", again.MessageId, again.Redelivered)
	}
	if again.DeliveryTag <= first.DeliveryTag {
		t.Fatalf("redelivery tag %d not after %d", again.DeliveryTag, first.DeliveryTag)
	}
	if err := again.Ack(false); err != nil {
		t.Fatal(err)
	}
	if next := receive(t, ds, 1)[0]; next.MessageId != "m2" || next.Redelivered {
		t.Fatalf("then got %q redelivered=%v, want m2 false", next.MessageId, next.Redelivered)
	}
}

// testDeadLetter: a message nacked without requeue goes to the queue's
// dead-letter exchange with RabbitMQ's x-death header; dying again in the
// same queue counts up the same entry.
func testDeadLetter(t *testing.T, e *env) {
	dlx := e.exchange("dlx", amqp091.ExchangeFanout, nil)
	dead := e.queue("dead", nil)
	e.bind(dead, "", dlx)
	x := e.exchange("events", amqp091.ExchangeTopic, nil)
	q := e.queue("q", amqp091.Table{"x-dead-letter-exchange": dlx})
	e.bind(q, "a.#", x)
	pub := e.confirmChannel()
	m := msg("m1")
	m.Headers = amqp091.Table{"h": "v"}
	m.Expiration = "600000"
	confirmed(t, publish(t, pub, x, "a.b", false, m))

	ch := e.channel()
	ds := consume(t, ch, q, "c")
	if err := receive(t, ds, 1)[0].Nack(false, false); err != nil {
		t.Fatal(err)
	}
	deadFeed := consume(t, e.channel(), dead, "d")
	d := receive(t, deadFeed, 1)[0]
	if d.Exchange != dlx || d.RoutingKey != "a.b" || d.MessageId != "m1" || string(d.Body) != "m1" || d.Redelivered {
		t.Fatalf("dead-lettered delivery: exchange %q key %q id %q body %q redelivered %v", d.Exchange, d.RoutingKey, d.MessageId, d.Body, d.Redelivered)
	}
	if d.Headers["h"] != "v" {
		t.Errorf("header h = %v, want v", d.Headers["h"])
	}
	checkDeath(t, d.Headers, int64(1), q, x, "a.b")
	// The per-message TTL is set aside, so the dead-lettered copy keeps.
	if death := d.Headers["x-death"].([]any)[0].(amqp091.Table); d.Expiration != "" || death["original-expiration"] != "600000" {
		t.Errorf("expiration %q, x-death original-expiration %v: want \"\" and 600000", d.Expiration, death["original-expiration"])
	}
	for k, want := range map[string]string{"x-first-death-reason": "rejected", "x-first-death-queue": q, "x-first-death-exchange": x} {
		if d.Headers[k] != want {
			t.Errorf("%s = %v, want %s", k, d.Headers[k], want)
		}
	}
	if err := d.Ack(false); err != nil {
		t.Fatal(err)
	}

	// Back into the queue with its headers, rejected again: one entry, count 2.
	confirmed(t, publish(t, pub, x, "a.b", false, amqp091.Publishing{MessageId: "m1", Headers: d.Headers, Body: d.Body}))
	if err := receive(t, ds, 1)[0].Reject(false); err != nil {
		t.Fatal(err)
	}
	d = receive(t, deadFeed, 1)[0]
	checkDeath(t, d.Headers, int64(2), q, x, "a.b")
}

// checkDeath checks an x-death header with one entry as RabbitMQ writes it.
func checkDeath(t *testing.T, h amqp091.Table, count int64, queue, exchange, key string) {
	t.Helper()
	deaths, ok := h["x-death"].([]any)
	if !ok || len(deaths) != 1 {
		t.Fatalf("x-death = %#v, want an array of one table", h["x-death"])
	}
	death, ok := deaths[0].(amqp091.Table)
	if !ok {
		t.Fatalf("x-death entry is %T, want amqp091.Table", deaths[0])
	}
	if death["count"] != count || death["reason"] != "rejected" || death["queue"] != queue || death["exchange"] != exchange {
		t.Errorf("x-death entry %#v: want count %d (int64), reason rejected, queue %s, exchange %s", death, count, queue, exchange)
	}
	if keys, ok := death["routing-keys"].([]any); !ok || len(keys) != 1 || keys[0] != key {
		t.Errorf("x-death routing-keys = %#v, want [%s]", death["routing-keys"], key)
	}
	if ts, ok := death["time"].(time.Time); !ok || ts.IsZero() {
		t.Errorf("x-death time = %#v, want a timestamp", death["time"])
	}
}

// testDeadLetterRoutingKey: the replay consumer's shape, dead-lettering
// through the default exchange with x-dead-letter-routing-key naming the
// dead queue.
func testDeadLetterRoutingKey(t *testing.T, e *env) {
	dead := e.queue("dead", nil)
	q := e.queue("q", amqp091.Table{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
	publishN(t, e, q, 1)
	if err := receive(t, consume(t, e.channel(), q, "c"), 1)[0].Nack(false, false); err != nil {
		t.Fatal(err)
	}
	d := receive(t, consumeAuto(t, e.channel(), dead), 1)[0]
	if d.Exchange != "" || d.RoutingKey != dead || d.MessageId != "m1" {
		t.Fatalf("dead-lettered delivery: exchange %q key %q id %q", d.Exchange, d.RoutingKey, d.MessageId)
	}
	checkDeath(t, d.Headers, int64(1), q, "", q)
}

// testRejectDrops: without a dead-letter exchange a rejected message is
// gone.
func testRejectDrops(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 2)
	ch := e.channel()
	ds := consume(t, ch, q, "c")
	got := receive(t, ds, 2)
	if err := ch.Nack(got[1].DeliveryTag, true, false); err != nil {
		t.Fatal(err)
	}
	pub := e.channel()
	if rest := untilFence(t, ds, fence(t, pub, q)); len(rest) != 0 {
		t.Fatalf("rejected messages came back: %q", rest)
	}
	e.awaitReady(q, 0)
}

// testChannelCloseRequeues: closing a channel with unacked deliveries
// closes its consumers' deliveries and requeues them, in order, flagged
// redelivered.
func testChannelCloseRequeues(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 3)
	ch := e.channel()
	ds := consume(t, ch, q, "c")
	receive(t, ds, 3)
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	awaitClosed(t, ds)
	e.awaitReady(q, 3)
	d := receive(t, consumeAuto(t, e.channel(), q), 3)
	if got := ids(d); !slices.Equal(got, []string{"m1", "m2", "m3"}) {
		t.Fatalf("requeued in order %q, want [m1 m2 m3]", got)
	}
	for _, x := range d {
		if !x.Redelivered {
			t.Errorf("%s not flagged redelivered", x.MessageId)
		}
	}
}

// testConnectionClose: closing a connection requeues its channels'
// unacked deliveries, closes their deliveries, and deletes its exclusive
// queues; another connection gets 405 on them meanwhile.
func testConnectionClose(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 2)
	c := e.connect()
	ch := e.channelOn(c)
	ds := consume(t, ch, q, "c")
	receive(t, ds, 2)
	excl, err := ch.QueueDeclare(e.name("exclusive"), false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.track(excl.Name, "")
	_, err = e.channel().QueueDeclarePassive(excl.Name, false, false, false, false, nil)
	expectCode(t, err, amqp091.ResourceLocked)
	closes := c.NotifyClose(make(chan *amqp091.Error, 1))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if e, ok := <-closes; ok {
		t.Fatalf("NotifyClose got %v on a client close, want nothing", e)
	}
	awaitClosed(t, ds)
	if !ch.IsClosed() {
		t.Fatal("channel open after its connection closed")
	}
	e.awaitReady(q, 2)
	if !eventually(func() bool { return !e.exists(excl.Name) }) {
		t.Fatal("exclusive queue outlived its connection")
	}
}

// testUnknownTag: acking a tag the channel never delivered closes it with
// 406.
func testUnknownTag(t *testing.T, e *env) {
	ch := e.channel()
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	_ = ch.Ack(42, false) // as over the wire, the refusal comes as the channel's close
	awaitError(t, closes, amqp091.PreconditionFailed)
}
