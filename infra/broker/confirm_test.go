package broker_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/sandbox"
)

// confirmSetup returns a connection for publishers and a channel for the
// test, with a namespaced shared topology.
func confirmSetup(t *testing.T) (*amqp091.Connection, *amqp091.Channel, broker.Topology) {
	t.Helper()
	ch, topo, url := declared(t)
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn, ch, topo
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestConfirmPublisherDeliversInOrderWithProperties(t *testing.T) {
	t.Parallel()
	conn, ch, topo := confirmSetup(t)
	queue := sandbox.Name("t") + ".confirm"
	sandbox.DeleteLater(t, []string{queue}, nil)
	if _, err := ch.QueueDeclare(queue, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(queue, "thing.#", topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}

	const window, n = 8, 2000
	pub, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), window)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx := ctxFor(t, 30*time.Second)
	for i := range n {
		p := amqp091.Publishing{Headers: amqp091.Table{"n": strconv.Itoa(i)}, Body: []byte(strconv.Itoa(i))}
		broker.SetMessageProperties(&p, fmt.Sprintf("id-%d", i), "corr")
		if err := pub.Publish(ctx, topo.EventsExchange, "thing.happened", p); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		if o := pub.Outstanding(); o > window {
			t.Fatalf("%d confirms outstanding, window is %d", o, window)
		}
	}
	if err := pub.Wait(ctx); err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if o := pub.Outstanding(); o != 0 {
		t.Fatalf("after Wait %d confirms outstanding", o)
	}
	// Every message is in the queue once Wait returned: confirms mean stored.
	q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if q.Messages != n {
		t.Fatalf("queue holds %d messages after Wait, want %d", q.Messages, n)
	}
	msgs, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		var d amqp091.Delivery
		select {
		case d = <-msgs:
		case <-ctx.Done():
			t.Fatalf("message %d did not arrive", i)
		}
		if string(d.Body) != strconv.Itoa(i) {
			t.Fatalf("message %d has body %q: out of order", i, d.Body)
		}
		if i == 0 {
			if d.MessageId != "id-0" || d.ContentType != "application/json" || d.DeliveryMode != amqp091.Persistent ||
				d.CorrelationId != "corr" || d.Timestamp.IsZero() || d.Headers[amqp.DefaultMessageUUIDHeaderKey] != "id-0" {
				t.Fatalf("properties not set: %+v", d)
			}
		}
	}
}

// A queue that rejects publishes when full makes the broker nack: the
// publisher reports it, and keeps reporting it.
func TestConfirmPublisherReportsNack(t *testing.T) {
	t.Parallel()
	conn, ch, topo := confirmSetup(t)
	queue := sandbox.Name("t") + ".full"
	sandbox.DeleteLater(t, []string{queue}, nil)
	if _, err := ch.QueueDeclare(queue, false, false, false, false,
		amqp091.Table{"x-max-length": int32(1), "x-overflow": "reject-publish"}); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(queue, "full.#", topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	pub, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx := ctxFor(t, 15*time.Second)
	for i := range 3 {
		err := pub.Publish(ctx, topo.EventsExchange, "full.x", amqp091.Publishing{Body: []byte{byte(i)}})
		if i > 0 && errors.Is(err, broker.ErrNacked) {
			break // the nack of an earlier message may already be in
		}
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	err = pub.Wait(ctx)
	if !errors.Is(err, broker.ErrNacked) {
		t.Fatalf("Wait = %v, want ErrNacked", err)
	}
	if err := pub.Publish(ctx, topo.EventsExchange, "full.x", amqp091.Publishing{}); !errors.Is(err, broker.ErrNacked) {
		t.Fatalf("Publish after a nack = %v, want the sticky ErrNacked", err)
	}
}

// Publishing to an exchange that does not exist makes the broker close the
// channel: Wait returns an error instead of hanging.
func TestConfirmPublisherReportsAClosedChannel(t *testing.T) {
	t.Parallel()
	conn, _, topo := confirmSetup(t)
	pub, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx := ctxFor(t, 15*time.Second)
	err = pub.Publish(ctx, topo.EventsExchange+".missing", "x", amqp091.Publishing{Body: []byte("x")})
	if err == nil {
		err = pub.Wait(ctx)
	}
	if !errors.Is(err, broker.ErrChannelClosed) {
		t.Fatalf("got %v, want ErrChannelClosed", err)
	}
	if ctx.Err() != nil {
		t.Fatal("the error came from the deadline, not from the closed channel")
	}
}

// A full window blocks Publish; ctx bounds that wait.
func TestConfirmPublisherPublishHonoursContext(t *testing.T) {
	t.Parallel()
	conn, _, topo := confirmSetup(t)
	pub, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := pub.Publish(ctx, topo.EventsExchange, "x", amqp091.Publishing{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Publish with a cancelled context = %v", err)
	}
	if _, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), -1); err == nil {
		t.Fatal("a negative window was accepted")
	}
	if _, err := broker.NewConfirmPublisher(nil, 0); err == nil {
		t.Fatal("a nil connection was accepted")
	}
}

// Sent numbers the publishes; WaitFor waits for a prefix of them, and
// Confirmed reports the confirmed prefix without waiting; a nack is an
// error of both.
func TestConfirmPublisherReportsConfirmedPrefix(t *testing.T) {
	t.Parallel()
	conn, ch, topo := confirmSetup(t)
	queue := sandbox.Name("t") + ".prefix"
	sandbox.DeleteLater(t, []string{queue}, nil)
	if _, err := ch.QueueDeclare(queue, false, false, false, false,
		amqp091.Table{"x-max-length": int32(5), "x-overflow": "reject-publish"}); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(queue, "prefix.#", topo.EventsExchange, false, nil); err != nil {
		t.Fatal(err)
	}
	pub, err := broker.NewConfirmPublisher(broker.WrapAMQP(conn), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	ctx := ctxFor(t, 15*time.Second)
	if got, err := pub.Confirmed(); pub.Sent() != 0 || got != 0 || err != nil {
		t.Fatalf("before any publish: sent %d, confirmed %d, %v", pub.Sent(), got, err)
	}
	for i := range 3 {
		if err := pub.Publish(ctx, topo.EventsExchange, "prefix.x", amqp091.Publishing{Body: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if pub.Sent() != 3 {
		t.Fatalf("Sent = %d after 3 publishes", pub.Sent())
	}
	if err := pub.WaitFor(ctx, 2); err != nil {
		t.Fatalf("WaitFor(2): %v", err)
	}
	if got, err := pub.Confirmed(); err != nil || got < 2 || got > 3 {
		t.Fatalf("Confirmed = %d, %v after WaitFor(2); want 2 or 3", got, err)
	}
	if err := pub.WaitFor(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if got, err := pub.Confirmed(); err != nil || got != 3 || pub.Outstanding() != 0 {
		t.Fatalf("Confirmed = %d, %v, %d outstanding after WaitFor(3)", got, err, pub.Outstanding())
	}
	// Three more overflow the queue of five: the sixth is nacked.
	for i := range 3 {
		if err := pub.Publish(ctx, topo.EventsExchange, "prefix.x", amqp091.Publishing{Body: []byte{byte(i)}}); err != nil && !errors.Is(err, broker.ErrNacked) {
			t.Fatal(err)
		}
	}
	if err := pub.WaitFor(ctx, 6); !errors.Is(err, broker.ErrNacked) {
		t.Fatalf("WaitFor(6) = %v, want ErrNacked", err)
	}
	if _, err := pub.Confirmed(); !errors.Is(err, broker.ErrNacked) {
		t.Fatalf("Confirmed after a nack = %v, want ErrNacked", err)
	}
}
