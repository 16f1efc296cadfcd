package brokertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

// waitLong bounds a wait for something that must happen: it only limits
// how long a failure takes to report (shared CI brokers are slow).
const waitLong = 15 * time.Second

// quietFor is how long a test waits to see that nothing more arrives, where
// no fence message can prove it: a bounded wait by nature.
const quietFor = 250 * time.Millisecond

// env is one test's view of the broker under test: a connection, names of
// its own (the RabbitMQ run shares its broker with other packages' tests)
// and the deletion of everything it declared when the test ends.
type env struct {
	t    *testing.T
	dial broker.Dialer
	ns   string
	conn broker.Conn

	mu        sync.Mutex
	setup     broker.Channel
	queues    []string
	exchanges []string
}

func newEnv(t *testing.T, dial func(t *testing.T) broker.Dialer) *env {
	t.Helper()
	e := &env{t: t, dial: dial(t), ns: "brokertest." + randomWord()}
	// Registered before any connection's Close, so it runs after them
	// (cleanups run last-in first-out) and finds exclusive queues gone.
	t.Cleanup(e.deleteDeclared)
	e.conn = e.connect()
	return e
}

func randomWord() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// name is a name in the test's namespace.
func (e *env) name(suffix string) string { return e.ns + "." + suffix }

// connect opens another connection, closed when the test ends.
func (e *env) connect() broker.Conn {
	e.t.Helper()
	c, err := e.dial("brokertest " + e.t.Name())
	if err != nil {
		e.t.Fatalf("dial: %v", err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return c
}

// channel opens a channel on the test's connection.
func (e *env) channel() broker.Channel { return e.channelOn(e.conn) }

func (e *env) channelOn(c broker.Conn) broker.Channel {
	e.t.Helper()
	ch, err := c.Channel()
	if err != nil {
		e.t.Fatalf("open channel: %v", err)
	}
	e.t.Cleanup(func() { _ = ch.Close() })
	return ch
}

// setupChannel is a channel for declarations that must succeed.
func (e *env) setupChannel() broker.Channel {
	e.t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.setup == nil || e.setup.IsClosed() {
		e.setup = e.channel()
	}
	return e.setup
}

func (e *env) track(queue, exchange string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if queue != "" {
		e.queues = append(e.queues, queue)
	}
	if exchange != "" {
		e.exchanges = append(e.exchanges, exchange)
	}
}

// exchange declares a non-durable exchange of kind named after suffix.
func (e *env) exchange(suffix, kind string, args amqp091.Table) string {
	e.t.Helper()
	name := e.name(suffix)
	e.track("", name)
	if err := e.setupChannel().ExchangeDeclare(name, kind, false, false, false, false, args); err != nil {
		e.t.Fatalf("declare exchange %s: %v", name, err)
	}
	return name
}

// queue declares a plain queue (non-durable, not exclusive, kept) named
// after suffix.
func (e *env) queue(suffix string, args amqp091.Table) string {
	e.t.Helper()
	name := e.name(suffix)
	e.track(name, "")
	if _, err := e.setupChannel().QueueDeclare(name, false, false, false, false, args); err != nil {
		e.t.Fatalf("declare queue %s: %v", name, err)
	}
	return name
}

func (e *env) bind(queue, key, exchange string) {
	e.t.Helper()
	if err := e.setupChannel().QueueBind(queue, key, exchange, false, nil); err != nil {
		e.t.Fatalf("bind %s to %s with %q: %v", queue, exchange, key, err)
	}
}

// deleteDeclared deletes the test's queues and exchanges on a connection of
// its own (the test's may be closed by now).
func (e *env) deleteDeclared() {
	e.mu.Lock()
	queues, exchanges := e.queues, e.exchanges
	e.mu.Unlock()
	if len(queues)+len(exchanges) == 0 {
		return
	}
	c, err := e.dial("brokertest cleanup")
	if err != nil {
		return // the broker is gone, and what it held with it
	}
	defer c.Close()
	var ch broker.Channel
	do := func(f func(broker.Channel) error) {
		if ch == nil || ch.IsClosed() {
			if ch, err = c.Channel(); err != nil {
				return
			}
		}
		if err := f(ch); err != nil {
			e.t.Logf("cleanup: %v", err)
		}
	}
	for _, q := range queues {
		do(func(ch broker.Channel) error { _, err := ch.QueueDelete(q, false, false, false); return err })
	}
	for _, x := range exchanges {
		do(func(ch broker.Channel) error { return ch.ExchangeDelete(x, false, false) })
	}
}

// exists reports whether the queue exists, on a channel of its own since a
// passive declare of a missing queue closes it.
func (e *env) exists(queue string) bool {
	e.t.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		e.t.Fatalf("open channel: %v", err)
	}
	defer ch.Close()
	_, err = ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err == nil {
		return true
	}
	expectCode(e.t, err, amqp091.NotFound)
	return false
}

// counts is the queue's ready messages and consumers.
func (e *env) counts(queue string) (ready, consumers int) {
	e.t.Helper()
	q, err := e.setupChannel().QueueDeclarePassive(queue, false, false, false, false, nil)
	if err != nil {
		e.t.Fatalf("passive declare %s: %v", queue, err)
	}
	return q.Messages, q.Consumers
}

// awaitReady waits until the queue holds n ready messages.
func (e *env) awaitReady(queue string, n int) {
	e.t.Helper()
	var got int
	if !eventually(func() bool { got, _ = e.counts(queue); return got == n }) {
		e.t.Fatalf("queue %s: %d ready messages, want %d", queue, got, n)
	}
}

// consume starts a consumer with manual acks.
func consume(t *testing.T, ch broker.Channel, queue, tag string) <-chan amqp091.Delivery {
	t.Helper()
	ds, err := ch.Consume(queue, tag, false, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	return ds
}

// consumeAuto starts a consumer with automatic acks.
func consumeAuto(t *testing.T, ch broker.Channel, queue string) <-chan amqp091.Delivery {
	t.Helper()
	ds, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	return ds
}

// msg is a message whose body and message id are both id.
func msg(id string) amqp091.Publishing {
	return amqp091.Publishing{MessageId: id, Body: []byte(id)}
}

func publish(t *testing.T, ch broker.Channel, exchange, key string, mandatory bool, m amqp091.Publishing) broker.Confirmation {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	c, err := ch.Publish(ctx, exchange, key, mandatory, m)
	if err != nil {
		t.Fatalf("publish to %q with %q: %v", exchange, key, err)
	}
	return c
}

// confirmed waits for every confirmation and fails on a nack.
func confirmed(t *testing.T, cs ...broker.Confirmation) {
	t.Helper()
	deadline := time.After(waitLong)
	for i, c := range cs {
		select {
		case <-c.Done():
		case <-deadline:
			t.Fatalf("confirmation %d of %d did not arrive", i+1, len(cs))
		}
		if !c.Acked() {
			t.Fatalf("confirmation %d of %d is a nack", i+1, len(cs))
		}
	}
}

// confirmChannel opens a channel in confirm mode.
func (e *env) confirmChannel() broker.Channel {
	e.t.Helper()
	ch := e.channel()
	if err := ch.Confirm(false); err != nil {
		e.t.Fatalf("confirm mode: %v", err)
	}
	return ch
}

// fence publishes a marker straight to queue (default exchange): published
// after other messages on the same channel, it arrives after every one of
// them that reached the queue, which proves what did not.
func fence(t *testing.T, ch broker.Channel, queue string) string {
	t.Helper()
	id := "fence-" + randomWord()
	publish(t, ch, "", queue, false, msg(id))
	return id
}

// untilFence returns the message ids received before the fence id.
func untilFence(t *testing.T, ds <-chan amqp091.Delivery, id string) []string {
	t.Helper()
	var got []string
	deadline := time.After(waitLong)
	for {
		select {
		case d, ok := <-ds:
			if !ok {
				t.Fatalf("deliveries closed before the fence; got %q", got)
			}
			if d.MessageId == id {
				return got
			}
			got = append(got, d.MessageId)
		case <-deadline:
			t.Fatalf("fence %s did not arrive; got %q", id, got)
		}
	}
}

// receive returns the next n deliveries.
func receive(t *testing.T, ds <-chan amqp091.Delivery, n int) []amqp091.Delivery {
	t.Helper()
	out := make([]amqp091.Delivery, 0, n)
	deadline := time.After(waitLong)
	for len(out) < n {
		select {
		case d, ok := <-ds:
			if !ok {
				t.Fatalf("deliveries closed after %d of %d", len(out), n)
			}
			out = append(out, d)
		case <-deadline:
			t.Fatalf("received %d of %d deliveries", len(out), n)
		}
	}
	return out
}

// quiet checks that nothing arrives for quietFor (a bounded wait: used only
// where a fence cannot be, as with a consumer held by its prefetch).
func quiet(t *testing.T, ds <-chan amqp091.Delivery) {
	t.Helper()
	select {
	case d, ok := <-ds:
		if ok {
			t.Fatalf("unexpected delivery %q (tag %d)", d.MessageId, d.DeliveryTag)
		}
		t.Fatal("deliveries closed unexpectedly")
	case <-time.After(quietFor):
	}
}

// awaitClosed waits for the deliveries channel to close, discarding what
// is still in it.
func awaitClosed(t *testing.T, ds <-chan amqp091.Delivery) {
	t.Helper()
	deadline := time.After(waitLong)
	for {
		select {
		case _, ok := <-ds:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("deliveries channel did not close")
		}
	}
}

// awaitError waits for a NotifyClose receiver to get an error with code.
func awaitError(t *testing.T, closes chan *amqp091.Error, code int) {
	t.Helper()
	select {
	case e, ok := <-closes:
		if !ok {
			t.Fatalf("closed without an error, want code %d", code)
		}
		if e.Code != code {
			t.Fatalf("closed with %v, want code %d", e, code)
		}
	case <-time.After(waitLong):
		t.Fatalf("not closed, want code %d", code)
	}
}

// expectCode checks that err is a broker exception with code.
func expectCode(t *testing.T, err error, code int) {
	t.Helper()
	var e *amqp091.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T), want an *amqp091.Error with code %d", err, err, code)
	}
	if e.Code != code {
		t.Fatalf("error %v, want code %d", e, code)
	}
}

func hasCode(err error, code int) bool {
	var e *amqp091.Error
	return errors.As(err, &e) && e.Code == code
}

// eventually polls cond until it holds or waitLong passes.
func eventually(cond func() bool) bool { return eventuallyEvery(10*time.Millisecond, cond) }

// eventuallyEvery polls cond every interval until it holds or waitLong
// passes.
func eventuallyEvery(interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(waitLong)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
}

func ids(ds []amqp091.Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.MessageId
	}
	return out
}
