package brokertest

import (
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

var declaringCases = []testCase{
	{"PassiveDeclareOfMissingQueueClosesChannel", testPassiveMissingQueue},
	{"PassiveDeclareOfMissingExchange", testPassiveMissingExchange},
	{"RedeclareWithOtherArgumentsFails", testRedeclareQueue},
	{"RedeclareExchangeWithOtherArgumentsFails", testRedeclareExchange},
	{"DeclareReportsCounts", testDeclareCounts},
	{"PurgeCountsReadyMessages", testPurge},
	{"DeleteQueueCancelsConsumers", testDeleteQueue},
	{"AutoDeleteQueueGoesWithLastConsumer", testAutoDelete},
	{"ServerNamedQueue", testServerNamed},
	{"BindToMissingThingsFails", testBindMissing},
	{"UnusedQueueExpires", testQueueExpires},
}

// testPassiveMissingQueue: 404, the channel closes, its NotifyClose
// receivers get the error, its consumers' deliveries close, and later
// calls on it fail.
func testPassiveMissingQueue(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.channel()
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	ds := consume(t, ch, q, "c")
	_, err := ch.QueueDeclarePassive(e.name("missing"), false, false, false, false, nil)
	expectCode(t, err, amqp091.NotFound)
	awaitError(t, closes, amqp091.NotFound)
	awaitClosed(t, ds)
	if !ch.IsClosed() {
		t.Fatal("channel open after 404")
	}
	if _, err := ch.QueueDeclarePassive(q, false, false, false, false, nil); err == nil {
		t.Fatal("a closed channel answered")
	}
	if _, consumers := e.counts(q); consumers != 0 {
		t.Fatalf("%d consumers left on the queue", consumers)
	}
	if e.conn.IsClosed() {
		t.Fatal("a channel exception closed the connection")
	}
}

func testPassiveMissingExchange(t *testing.T, e *env) {
	ch := e.channel()
	err := ch.ExchangeDeclarePassive(e.name("missing"), amqp091.ExchangeTopic, false, false, false, false, nil)
	expectCode(t, err, amqp091.NotFound)
	if !eventually(ch.IsClosed) {
		t.Fatal("channel open after 404")
	}
	x := e.exchange("x", amqp091.ExchangeTopic, nil)
	// A passive declare compares nothing but the name.
	if err := e.channel().ExchangeDeclarePassive(x, amqp091.ExchangeFanout, true, true, false, false, nil); err != nil {
		t.Fatalf("passive declare of an existing exchange: %v", err)
	}
}

// testRedeclareQueue: a redeclare must match flags and the arguments
// RabbitMQ compares (406 otherwise); integer widths do not matter, unknown
// arguments are not compared, x-queue-type classic is the default.
func testRedeclareQueue(t *testing.T, e *env) {
	q := e.queue("q", amqp091.Table{"x-dead-letter-exchange": "a", "x-expires": int32(600000)})
	redeclare := func(durable bool, args amqp091.Table) error {
		_, err := e.channel().QueueDeclare(q, durable, false, false, false, args)
		return err
	}
	same := amqp091.Table{"x-dead-letter-exchange": "a", "x-expires": int64(600000), "x-queue-type": "classic", "x-statemill-note": "ignored"}
	if err := redeclare(false, same); err != nil {
		t.Fatalf("equivalent redeclare: %v", err)
	}
	for name, args := range map[string]amqp091.Table{
		"other dead-letter exchange": {"x-dead-letter-exchange": "b", "x-expires": int32(600000)},
		"missing x-expires":          {"x-dead-letter-exchange": "a"},
		"added dead-letter key":      {"x-dead-letter-exchange": "a", "x-expires": int32(600000), "x-dead-letter-routing-key": "k"},
	} {
		if err := redeclare(false, args); !hasCode(err, amqp091.PreconditionFailed) {
			t.Errorf("redeclare with %s: %v, want 406", name, err)
		}
	}
	expectCode(t, redeclare(true, amqp091.Table{"x-dead-letter-exchange": "a", "x-expires": int32(600000)}), amqp091.PreconditionFailed)
	_, err := e.channel().QueueDeclare(q, false, false, true, false, amqp091.Table{"x-dead-letter-exchange": "a", "x-expires": int32(600000)})
	expectCode(t, err, amqp091.ResourceLocked)
	// Arguments RabbitMQ validates on a new queue.
	_, err = e.channel().QueueDeclare(e.name("bad"), false, false, false, false, amqp091.Table{"x-dead-letter-routing-key": "k"})
	expectCode(t, err, amqp091.PreconditionFailed)
	_, err = e.channel().QueueDeclare(e.name("bad"), false, false, false, false, amqp091.Table{"x-expires": int32(0)})
	expectCode(t, err, amqp091.PreconditionFailed)
	e.track(e.name("bad"), "")
}

func testRedeclareExchange(t *testing.T, e *env) {
	x := e.exchange("x", amqp091.ExchangeTopic, amqp091.Table{"alternate-exchange": "a"})
	declare := func(kind string, durable bool, args amqp091.Table) error {
		return e.channel().ExchangeDeclare(x, kind, durable, false, false, false, args)
	}
	if err := declare(amqp091.ExchangeTopic, false, amqp091.Table{"alternate-exchange": "a", "other": "ignored"}); err != nil {
		t.Fatalf("equivalent redeclare: %v", err)
	}
	expectCode(t, declare(amqp091.ExchangeDirect, false, amqp091.Table{"alternate-exchange": "a"}), amqp091.PreconditionFailed)
	expectCode(t, declare(amqp091.ExchangeTopic, true, amqp091.Table{"alternate-exchange": "a"}), amqp091.PreconditionFailed)
	expectCode(t, declare(amqp091.ExchangeTopic, false, amqp091.Table{"alternate-exchange": "b"}), amqp091.PreconditionFailed)
	expectCode(t, declare(amqp091.ExchangeTopic, false, nil), amqp091.PreconditionFailed)
	expectCode(t, e.channel().ExchangeDeclare("", amqp091.ExchangeDirect, false, false, false, false, nil), amqp091.AccessRefused)
	expectCode(t, e.channel().ExchangeDeclare("amq."+e.name("x"), amqp091.ExchangeDirect, false, false, false, false, nil), amqp091.AccessRefused)
}

// testDeclareCounts: a declare reports ready messages (not the unacked
// ones) and consumers.
func testDeclareCounts(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 4)
	ch := e.channel()
	if err := ch.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	receive(t, consume(t, ch, q, "c"), 1)
	e.awaitReady(q, 3)
	got, err := e.setupChannel().QueueDeclare(q, false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != q || got.Messages != 3 || got.Consumers != 1 {
		t.Fatalf("declare = %+v, want %s with 3 messages and 1 consumer", got, q)
	}
}

// testPurge: purge drops and counts the ready messages only; unacked ones
// can still be acked.
func testPurge(t *testing.T, e *env) {
	q := e.queue("q", nil)
	publishN(t, e, q, 5)
	ch := e.channel()
	if err := ch.Qos(2, 0, false); err != nil {
		t.Fatal(err)
	}
	got := receive(t, consume(t, ch, q, "c"), 2)
	e.awaitReady(q, 3)
	n, err := e.setupChannel().QueuePurge(q, false)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("purged %d, want 3", n)
	}
	e.awaitReady(q, 0)
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if err := ch.Ack(got[1].DeliveryTag, true); err != nil {
		t.Fatal(err)
	}
	// A fence-like proof that the acks were taken: a channel method answers
	// only after them, and the channel is still open.
	if err := ch.Qos(2, 0, false); err != nil {
		t.Fatalf("channel broken after acking purged-around deliveries: %v", err)
	}
	select {
	case err := <-closes:
		t.Fatalf("channel closed: %v", err)
	default:
	}
	_, err = e.channel().QueuePurge(e.name("missing"), false)
	expectCode(t, err, amqp091.NotFound)
}

// testDeleteQueue: deleting a queue returns its ready count, cancels its
// consumers (NotifyCancel, deliveries closed) without closing their
// channel; deleting a missing queue is no error.
func testDeleteQueue(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.channel()
	cancels := ch.NotifyCancel(make(chan string, 1))
	if err := ch.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	ds := consume(t, ch, q, "c")
	publishN(t, e, q, 3)
	receive(t, ds, 1)
	e.awaitReady(q, 2)
	n, err := e.setupChannel().QueueDelete(q, false, false, false)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Fatalf("delete reported %d messages, want 2", n)
	}
	select {
	case tag := <-cancels:
		if tag != "c" {
			t.Fatalf("cancelled %q, want c", tag)
		}
	case <-time.After(waitLong):
		t.Fatal("no NotifyCancel after the queue was deleted")
	}
	awaitClosed(t, ds)
	if ch.IsClosed() {
		t.Fatal("deleting the queue closed the consumer's channel")
	}
	if n, err := e.setupChannel().QueueDelete(q, false, false, false); err != nil || n != 0 {
		t.Fatalf("deleting a missing queue: %d, %v", n, err)
	}
}

// testAutoDelete: an auto-delete queue lives until its last consumer goes.
func testAutoDelete(t *testing.T, e *env) {
	name := e.name("auto")
	e.track(name, "")
	ch := e.channel()
	if _, err := ch.QueueDeclare(name, false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	consume(t, ch, name, "c1")
	consume(t, ch, name, "c2")
	if err := ch.Cancel("c1", false); err != nil {
		t.Fatal(err)
	}
	if !e.exists(name) {
		t.Fatal("auto-delete queue gone while a consumer remains")
	}
	if err := ch.Cancel("c2", false); err != nil {
		t.Fatal(err)
	}
	if !eventually(func() bool { return !e.exists(name) }) {
		t.Fatal("auto-delete queue outlived its last consumer")
	}
}

// testServerNamed: a queue declared as "" gets a fresh amq.gen- name.
func testServerNamed(t *testing.T, e *env) {
	ch := e.channel()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.track(q.Name, "")
	if !strings.HasPrefix(q.Name, "amq.gen-") {
		t.Fatalf("server-named queue %q", q.Name)
	}
	q2, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.track(q2.Name, "")
	if q2.Name == q.Name {
		t.Fatal("two server-named queues got one name")
	}
	publishN(t, e, q.Name, 1)
	if d := receive(t, consumeAuto(t, ch, q.Name), 1)[0]; d.MessageId != "m1" {
		t.Fatalf("got %q", d.MessageId)
	}
	_, err = e.channel().QueueDeclare("amq."+e.name("mine"), false, false, false, false, nil)
	expectCode(t, err, amqp091.AccessRefused)
}

// testBindMissing: binding a missing queue or to a missing exchange is 404,
// binding to the default exchange 403; unbinding what is not there is no
// error.
func testBindMissing(t *testing.T, e *env) {
	x := e.exchange("x", amqp091.ExchangeTopic, nil)
	q := e.queue("q", nil)
	expectCode(t, e.channel().QueueBind(e.name("missing"), "k", x, false, nil), amqp091.NotFound)
	expectCode(t, e.channel().QueueBind(q, "k", e.name("missing"), false, nil), amqp091.NotFound)
	expectCode(t, e.channel().QueueBind(q, "k", "", false, nil), amqp091.AccessRefused)
	if err := e.channel().QueueUnbind(q, "never", x, nil); err != nil {
		t.Fatalf("unbinding an absent binding: %v", err)
	}
	if err := e.channel().ExchangeDelete(e.name("missing"), false, false); err != nil {
		t.Fatalf("deleting a missing exchange: %v", err)
	}
}

// testQueueExpires: a queue with x-expires is deleted once it has had no
// consumer for that long, not while it has one. A declare, passive too,
// counts as a use (RabbitMQ renews the lease), so the checks poll less often
// than the queue expires.
func testQueueExpires(t *testing.T, e *env) {
	const expires = 300 * time.Millisecond
	args := amqp091.Table{"x-expires": int32(expires.Milliseconds())}
	used, unused := e.queue("used", args), e.queue("unused", args)
	ch := e.channel()
	consume(t, ch, used, "c")
	gone := func(q string) func() bool { return func() bool { return !e.exists(q) } }
	if !eventuallyEvery(2*expires, gone(unused)) {
		t.Fatal("unused queue did not expire")
	}
	if !e.exists(used) {
		t.Fatal("a queue with a consumer expired")
	}
	if err := ch.Cancel("c", false); err != nil {
		t.Fatal(err)
	}
	if !eventuallyEvery(2*expires, gone(used)) {
		t.Fatal("queue did not expire after its consumer left")
	}
}
