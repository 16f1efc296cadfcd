package brokertest

import (
	"context"
	"slices"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

var routingCases = []testCase{
	{"DirectExchange", testDirect},
	{"FanoutExchange", testFanout},
	{"DefaultExchange", testDefaultExchange},
	{"AlternateExchangeTakesUnroutable", testAlternateExchange},
	{"MandatoryUnroutableIsReturned", testMandatoryReturn},
	{"PublishToMissingExchangeClosesChannel", testPublishMissingExchange},
}

func testDirect(t *testing.T, e *env) {
	x := e.exchange("direct", amqp091.ExchangeDirect, nil)
	q1, q2, q3 := e.queue("q1", nil), e.queue("q2", nil), e.queue("q3", nil)
	e.bind(q1, "k1", x)
	e.bind(q2, "k2", x)
	e.bind(q3, "k1", x)
	e.bind(q3, "k2", x)
	ch := e.channel()
	for _, k := range []string{"k1", "k2", "k3", "k1.x", ""} {
		publish(t, ch, x, k, false, msg(k))
	}
	want := map[string][]string{q1: {"k1"}, q2: {"k2"}, q3: {"k1", "k2"}}
	for q, w := range want {
		if got := untilFence(t, consumeAuto(t, e.channel(), q), fence(t, ch, q)); !slices.Equal(got, w) {
			t.Errorf("%s got %q, want %q", q, got, w)
		}
	}
}

func testFanout(t *testing.T, e *env) {
	x := e.exchange("fanout", amqp091.ExchangeFanout, nil)
	q1, q2 := e.queue("q1", nil), e.queue("q2", nil)
	e.bind(q1, "", x)
	e.bind(q2, "ignored", x)
	ch := e.channel()
	publish(t, ch, x, "a", false, msg("m1"))
	publish(t, ch, x, "", false, msg("m2"))
	for _, q := range []string{q1, q2} {
		if got := untilFence(t, consumeAuto(t, e.channel(), q), fence(t, ch, q)); !slices.Equal(got, []string{"m1", "m2"}) {
			t.Errorf("%s got %q, want [m1 m2]", q, got)
		}
	}
}

// testDefaultExchange: "" routes to the queue named by the key, and the
// delivery says so.
func testDefaultExchange(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.confirmChannel()
	returns := ch.NotifyReturn(make(chan amqp091.Return, 1))
	confirmed(t, publish(t, ch, "", q, false, msg("m1")))
	d := receive(t, consumeAuto(t, e.channel(), q), 1)[0]
	if d.Exchange != "" || d.RoutingKey != q || d.MessageId != "m1" {
		t.Fatalf("delivery exchange %q key %q id %q, want \"\" %q m1", d.Exchange, d.RoutingKey, d.MessageId, q)
	}
	confirmed(t, publish(t, ch, "", e.name("nobody"), true, msg("m2")))
	select {
	case r := <-returns:
		if r.MessageId != "m2" || r.ReplyCode != amqp091.NoRoute {
			t.Fatalf("return %q code %d, want m2 %d", r.MessageId, r.ReplyCode, amqp091.NoRoute)
		}
	case <-time.After(waitLong):
		t.Fatal("a mandatory message to a missing queue was not returned")
	}
}

// testAlternateExchange: what the exchange cannot route goes to its
// alternate exchange, and is then not returned even if mandatory.
func testAlternateExchange(t *testing.T, e *env) {
	ae := e.exchange("ae", amqp091.ExchangeFanout, nil)
	x := e.exchange("events", amqp091.ExchangeTopic, amqp091.Table{"alternate-exchange": ae})
	q, aq := e.queue("q", nil), e.queue("unroutable", nil)
	e.bind(q, "a.#", x)
	e.bind(aq, "", ae)
	ch := e.confirmChannel()
	returns := ch.NotifyReturn(make(chan amqp091.Return, 4))
	confirmed(t,
		publish(t, ch, x, "a.1", true, msg("a.1")),
		publish(t, ch, x, "z.1", true, msg("z.1")),
		publish(t, ch, x, "z.2", false, msg("z.2")),
	)
	// Returns precede their confirms, so none can still be on its way.
	select {
	case r := <-returns:
		t.Fatalf("message %q returned although the alternate exchange took it", r.MessageId)
	default:
	}
	if got := untilFence(t, consumeAuto(t, e.channel(), q), fence(t, ch, q)); !slices.Equal(got, []string{"a.1"}) {
		t.Errorf("bound queue got %q, want [a.1]", got)
	}
	d := receive(t, consumeAuto(t, e.channel(), aq), 2)
	if got := ids(d); !slices.Equal(got, []string{"z.1", "z.2"}) {
		t.Errorf("alternate queue got %q, want [z.1 z.2]", got)
	}
	if d[0].Exchange != x || d[0].RoutingKey != "z.1" {
		t.Errorf("alternate delivery exchange %q key %q, want the original %q z.1", d[0].Exchange, d[0].RoutingKey, x)
	}

	// An alternate exchange that does not exist takes nothing: the message
	// is unroutable, so a mandatory one is returned.
	dangling := e.exchange("dangling", amqp091.ExchangeTopic, amqp091.Table{"alternate-exchange": e.name("missing")})
	confirmed(t, publish(t, ch, dangling, "z.3", true, msg("z.3")))
	select {
	case r := <-returns:
		if r.MessageId != "z.3" {
			t.Fatalf("returned %q, want z.3", r.MessageId)
		}
	default:
		t.Fatal("a mandatory message was not returned although its alternate exchange is missing")
	}
}

// testMandatoryReturn: an unroutable mandatory message comes back through
// NotifyReturn and is still confirmed; a non-mandatory one is dropped
// silently.
func testMandatoryReturn(t *testing.T, e *env) {
	x := e.exchange("direct", amqp091.ExchangeDirect, nil)
	ch := e.confirmChannel()
	returns := ch.NotifyReturn(make(chan amqp091.Return, 4))
	m := msg("r1")
	m.ContentType = "application/json"
	m.Headers = amqp091.Table{"h": "v"}
	confirmed(t, publish(t, ch, x, "nowhere", true, m))
	select {
	case r := <-returns:
		if r.ReplyCode != amqp091.NoRoute || r.ReplyText != "NO_ROUTE" || r.Exchange != x || r.RoutingKey != "nowhere" ||
			r.MessageId != "r1" || string(r.Body) != "r1" || r.ContentType != "application/json" || r.Headers["h"] != "v" {
			t.Fatalf("return = %+v", r)
		}
	case <-time.After(waitLong):
		t.Fatal("mandatory message not returned")
	}
	// The second return to arrive must be r2: n1 was not mandatory.
	confirmed(t, publish(t, ch, x, "nowhere", false, msg("n1")), publish(t, ch, x, "nowhere", true, msg("r2")))
	select {
	case r := <-returns:
		if r.MessageId != "r2" {
			t.Fatalf("returned %q, want r2 (n1 was not mandatory)", r.MessageId)
		}
	case <-time.After(waitLong):
		t.Fatal("mandatory message r2 not returned")
	}
}

// testPublishMissingExchange: the publish itself succeeds, as over the
// wire; the broker then closes the channel with 404 and the pending
// confirmation is a nack.
func testPublishMissingExchange(t *testing.T, e *env) {
	ch := e.confirmChannel()
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	c, err := ch.Publish(ctx, e.name("missing"), "k", false, msg("m"))
	if err != nil {
		expectCode(t, err, amqp091.NotFound)
	}
	awaitError(t, closes, amqp091.NotFound)
	if c != nil {
		select {
		case <-c.Done():
			if c.Acked() {
				t.Fatal("a publish to a missing exchange was acked")
			}
		case <-time.After(waitLong):
			t.Fatal("the confirmation never completed after the channel closed")
		}
	}
	if !ch.IsClosed() {
		t.Fatal("channel still open")
	}
	if _, err := ch.Publish(ctx, "", "k", false, msg("m")); err == nil {
		t.Fatal("publish on a closed channel succeeded")
	}
}
