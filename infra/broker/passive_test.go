package broker_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/sandbox"
)

func TestParseDeclareMode(t *testing.T) {
	t.Parallel()
	for v, want := range map[string]bool{"": false, "declare": false, "passive": true} {
		got, err := broker.ParseDeclareMode(v)
		if err != nil || got != want {
			t.Errorf("ParseDeclareMode(%q) = %t, %v; want %t, nil", v, got, err, want)
		}
	}
	for _, v := range []string{"Passive", "PASSIVE", " passive", "yes", "true", "1"} {
		if _, err := broker.ParseDeclareMode(v); err == nil || !strings.Contains(err.Error(), `"passive"`) {
			t.Errorf("ParseDeclareMode(%q): %v, want an error naming the valid modes", v, err)
		}
	}
}

// TestDeclareSharedPassive: a passive DeclareShared against exchanges that
// do not exist fails with an error that names the missing one and the
// definitions file, and declares nothing; after a normal declare it
// succeeds and leaves the channel usable.
func TestDeclareSharedPassive(t *testing.T) {
	t.Parallel()
	url, ns := sandbox.Broker(t)
	topo := broker.Topology{EventsExchange: ns + ".events", CommandsExchange: ns + ".commands"}
	sandbox.DeleteLater(t, []string{topo.UnroutableQueue()},
		[]string{topo.EventsExchange, topo.CommandsExchange, topo.UnroutableExchange()})
	passive := topo
	passive.Passive = true
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	channel := func() *amqp091.Channel {
		t.Helper()
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ch.Close() })
		return ch
	}

	err = broker.DeclareShared(broker.WrapAMQPChannel(channel()), passive)
	var me *broker.MissingError
	if !errors.As(err, &me) {
		t.Fatalf("passive DeclareShared of a topology nobody declared: %v, want a *broker.MissingError", err)
	}
	if me.Kind != "exchange" || me.Name != topo.UnroutableExchange() {
		t.Errorf("missing %s %q, want the first object checked, exchange %q", me.Kind, me.Name, topo.UnroutableExchange())
	}
	for _, want := range []string{`exchange "` + topo.UnroutableExchange() + `" does not exist`, "definitions file", "rabbitmq/definitions.json", "AMQP_DECLARE=passive"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	var ae *amqp091.Error
	if !errors.As(err, &ae) || ae.Code != amqp091.NotFound {
		t.Errorf("error %v does not wrap the broker's 404", err)
	}
	// Nothing was declared: a passive check of each object still fails.
	for _, x := range []string{topo.UnroutableExchange(), topo.EventsExchange, topo.CommandsExchange} {
		if err := broker.CheckExchange(broker.WrapAMQPChannel(channel()), x); !errors.As(err, &me) {
			t.Errorf("exchange %s exists after a passive DeclareShared (%v)", x, err)
		}
	}
	if _, err := broker.CheckQueue(broker.WrapAMQPChannel(channel()), topo.UnroutableQueue()); !errors.As(err, &me) || me.Kind != "queue" || me.Name != topo.UnroutableQueue() {
		t.Errorf("queue %s: %v, want a *broker.MissingError for it", topo.UnroutableQueue(), err)
	}

	// Only part of the topology: the error names the first missing object.
	ch := channel()
	if err := ch.ExchangeDeclare(topo.UnroutableExchange(), amqp091.ExchangeFanout, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(topo.UnroutableQueue(), true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	err = broker.DeclareShared(broker.WrapAMQPChannel(channel()), passive)
	if !errors.As(err, &me) || me.Name != topo.EventsExchange {
		t.Errorf("passive DeclareShared without %s: %v, want a *broker.MissingError naming it", topo.EventsExchange, err)
	}

	if err := broker.DeclareShared(broker.WrapAMQPChannel(channel()), topo); err != nil {
		t.Fatalf("DeclareShared: %v", err)
	}
	ch = channel()
	for i := range 2 {
		if err := broker.DeclareShared(broker.WrapAMQPChannel(ch), passive); err != nil {
			t.Fatalf("passive DeclareShared #%d after a declare: %v", i+1, err)
		}
	}
	// The passive checks did not break the channel.
	if err := ch.Publish(topo.EventsExchange, "product.create", false, false, amqp091.Publishing{Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	if err := ch.Close(); err != nil {
		t.Errorf("the passive declares left the channel broken: %v", err)
	}
	// The topology is the real one: an unroutable publish reaches the
	// alternate exchange's queue.
	var n int
	if !eventually(t, 30*time.Second, func() bool {
		ch, err := conn.Channel()
		if err != nil {
			return false
		}
		defer ch.Close()
		q, err := broker.CheckQueue(broker.WrapAMQPChannel(ch), topo.UnroutableQueue())
		n = q.Messages
		return err == nil && n == 1
	}) {
		t.Errorf("%s holds %d messages, want the one unroutable publish", topo.UnroutableQueue(), n)
	}
}
