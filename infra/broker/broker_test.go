package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/sandbox"
)

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, cond func() bool) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// declared dials the broker, declares a namespaced shared topology (twice, on
// two channels: DeclareShared must be idempotent) and returns a channel.
func declared(t *testing.T) (*amqp091.Channel, broker.Topology, string) {
	t.Helper()
	url, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	sandbox.DeleteLater(t, []string{topo.UnroutableQueue()},
		[]string{topo.EventsExchange, topo.CommandsExchange, topo.UnroutableExchange()})
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	for i := range 2 {
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		if err := broker.DeclareShared(broker.WrapAMQPChannel(ch), topo); err != nil {
			t.Fatalf("DeclareShared #%d: %v", i+1, err)
		}
		if err := ch.Close(); err != nil {
			t.Fatalf("DeclareShared #%d left the channel broken: %v", i+1, err)
		}
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Close() })
	return ch, topo, url
}

func TestTopologyDefaultsAndValidate(t *testing.T) {
	t.Parallel()
	d := broker.Topology{}.WithDefaults()
	if d.EventsExchange != "events" || d.CommandsExchange != "commands" {
		t.Fatalf("defaults = %+v", d)
	}
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (broker.Topology{EventsExchange: "x"}).Validate(); err == nil {
		t.Fatal("Validate accepted an empty commands exchange")
	}
	if d.UnroutableExchange() == d.EventsExchange {
		t.Fatal("the alternate exchange must not be the events exchange")
	}
}

func TestDeclareSharedIsIdempotentAndKeepsUnroutable(t *testing.T) {
	t.Parallel()
	ch, topo, _ := declared(t)

	// Passive declarations prove the objects exist with the expected kind.
	if err := ch.ExchangeDeclarePassive(topo.EventsExchange, amqp091.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatalf("events exchange: %v", err)
	}
	if err := ch.ExchangeDeclarePassive(topo.CommandsExchange, amqp091.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatalf("commands exchange: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	id := watermill.NewUUID()
	conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, topo.EventsExchange, "nobody.is.bound.here", false, false,
		amqp091.Publishing{MessageId: id, ContentType: "application/json", DeliveryMode: amqp091.Persistent, Body: []byte(`{"n":1}`)})
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if ok, err := conf.WaitContext(ctx); err != nil || !ok {
		t.Fatalf("publish not confirmed: ok=%v err=%v", ok, err)
	}

	var got amqp091.Delivery
	found := eventually(t, 10*time.Second, func() bool {
		d, ok, err := ch.Get(topo.UnroutableQueue(), true)
		if err != nil {
			t.Fatalf("get: %v", err)
		}
		if ok {
			got = d
		}
		return ok
	})
	if !found {
		t.Fatalf("the unroutable message never reached %s: the alternate exchange does not work", topo.UnroutableQueue())
	}
	if got.MessageId != id || string(got.Body) != `{"n":1}` || got.RoutingKey != "nobody.is.bound.here" {
		t.Fatalf("unroutable queue holds %q %q %q, want %q", got.MessageId, got.RoutingKey, got.Body, id)
	}
}

func TestPublisherSetsWireProperties(t *testing.T) {
	t.Parallel()
	ch, topo, url := declared(t)
	q := topo.EventsExchange + ".probe"
	sandbox.DeleteLater(t, []string{q}, nil)
	if _, err := ch.QueueDeclare(q, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q, "widget.#", topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}

	conn, err := broker.Connect(url, watermill.NopLogger{})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	pub, err := broker.NewPublisher(conn, broker.PublisherConfig{Exchange: topo.EventsExchange}, watermill.NopLogger{})
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	t.Cleanup(func() { _ = pub.Close() })

	msg := message.NewMessage(watermill.NewUUID(), []byte(`{"id":"w"}`))
	msg.Metadata.Set(envelope.HeaderCorrelationID, "corr-p")
	msg.Metadata.Set(envelope.HeaderSchemaVersion, "1")
	if err := pub.Publish("widget.create", msg); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	select {
	case d := <-deliveries:
		if d.RoutingKey != "widget.create" || d.MessageId != msg.UUID || d.ContentType != "application/json" ||
			d.DeliveryMode != 2 || d.CorrelationId != "corr-p" || d.Exchange != topo.EventsExchange {
			t.Fatalf("delivery: key %q id %q type %q mode %d corr %q exchange %q",
				d.RoutingKey, d.MessageId, d.ContentType, d.DeliveryMode, d.CorrelationId, d.Exchange)
		}
		if d.Headers[envelope.HeaderCorrelationID] != "corr-p" || d.Headers[envelope.HeaderSchemaVersion] != "1" {
			t.Fatalf("headers = %v", d.Headers)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery from the publisher")
	}

	// An exchange that does not exist is refused (the publisher only
	// declares passively; it never creates one without the alternate exchange).
	pub2, err := broker.NewPublisher(conn, broker.PublisherConfig{Exchange: topo.EventsExchange + ".missing"}, watermill.NopLogger{})
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	t.Cleanup(func() { _ = pub2.Close() })
	if err := pub2.Publish("widget.create", message.NewMessage(watermill.NewUUID(), []byte(`{}`))); err == nil {
		sandbox.DeleteLater(t, nil, []string{topo.EventsExchange + ".missing"})
		t.Fatal("publishing to a missing exchange succeeded: the publisher declared it")
	}
}
