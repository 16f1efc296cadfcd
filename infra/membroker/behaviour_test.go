package membroker_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/membroker"
)

const wait = 10 * time.Second // bounds a failure only

func dial(t *testing.T, b *membroker.Broker) broker.Conn {
	t.Helper()
	c, err := b.Dial(t.Name())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func channel(t *testing.T, c broker.Conn) broker.Channel {
	t.Helper()
	ch, err := c.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

func code(err error) int {
	var e *amqp091.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// TestBrokerCloseForcesConnections: Close tells connections and channels
// with 320, as a RabbitMQ shutting down does, and closes deliveries.
func TestBrokerCloseForcesConnections(t *testing.T) {
	b := newBroker(t)
	c := dial(t, b)
	connCloses := c.NotifyClose(make(chan *amqp091.Error, 1))
	ch := channel(t, c)
	chCloses := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if _, err := ch.QueueDeclare("q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	ds, err := ch.Consume("q", "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]chan *amqp091.Error{"connection": connCloses, "channel": chCloses} {
		if e := <-r; e == nil || e.Code != amqp091.ConnectionForced {
			t.Errorf("%s NotifyClose got %v, want 320", name, e)
		}
	}
	if _, ok := <-ds; ok {
		t.Fatal("delivery after close")
	}
	if !c.IsClosed() || !ch.IsClosed() {
		t.Fatal("connection or channel still open")
	}
	if _, err := ch.Publish(context.Background(), "", "q", false, amqp091.Publishing{}); !errors.Is(err, amqp091.ErrClosed) {
		t.Fatalf("publish after close: %v", err)
	}
	if _, err := c.Channel(); !errors.Is(err, amqp091.ErrClosed) {
		t.Fatalf("channel after close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, amqp091.ErrClosed) {
		t.Fatalf("second connection close: %v, want ErrClosed as amqp091 says", err)
	}
	if r := c.NotifyClose(make(chan *amqp091.Error, 1)); r != nil {
		if _, ok := <-r; ok {
			t.Fatal("NotifyClose on a closed connection got a value")
		}
	}
}

// TestUnimplementedArgumentsRefused: queue arguments that would change
// behaviour and are not implemented are refused, never silently ignored.
func TestUnimplementedArgumentsRefused(t *testing.T) {
	b := newBroker(t)
	c := dial(t, b)
	for _, args := range []amqp091.Table{
		{"x-message-ttl": int32(1000)}, {"x-max-length": int32(10)}, {"x-single-active-consumer": true}, {"x-queue-type": "quorum"},
	} {
		_, err := channel(t, c).QueueDeclare("q", true, false, false, false, args)
		if code(err) != amqp091.PreconditionFailed {
			t.Errorf("declare with %v: %v, want 406", args, err)
		}
	}
	for _, args := range []amqp091.Table{{"x-queue-type": "classic"}, {"x-queue-mode": "lazy"}, {"x-custom": 1}} {
		if _, err := channel(t, c).QueueDeclare(fmt.Sprint(args), true, false, false, false, args); err != nil {
			t.Errorf("declare with %v: %v", args, err)
		}
	}
	err := channel(t, c).ExchangeDeclare("h", amqp091.ExchangeHeaders, true, false, false, false, nil)
	if code(err) != amqp091.NotImplemented || !c.IsClosed() {
		t.Fatalf("headers exchange: %v (connection closed: %v), want 540 closing the connection", err, c.IsClosed())
	}
}

// TestLimits: MaxMessageBytes and ChannelMax.
func TestLimits(t *testing.T) {
	b, err := membroker.New(membroker.Config{ChannelMax: 2, MaxMessageBytes: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	c := dial(t, b)
	ch := channel(t, c)
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if _, err := ch.Publish(context.Background(), "", "q", false, amqp091.Publishing{Body: make([]byte, 9)}); err != nil {
		t.Fatal(err)
	}
	if e := <-closes; e == nil || e.Code != amqp091.PreconditionFailed {
		t.Fatalf("oversized publish closed the channel with %v, want 406", e)
	}
	channel(t, c)
	channel(t, c)
	if _, err := c.Channel(); err == nil {
		t.Fatal("a third channel opened with ChannelMax 2")
	}
}

// TestPublisherMayReuseItsBuffers: the broker copies what it is given.
func TestPublisherMayReuseItsBuffers(t *testing.T) {
	c := dial(t, newBroker(t))
	ch := channel(t, c)
	if _, err := ch.QueueDeclare("q", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	body := []byte("first")
	headers := amqp091.Table{"h": "first"}
	if _, err := ch.Publish(context.Background(), "", "q", false, amqp091.Publishing{Body: body, Headers: headers}); err != nil {
		t.Fatal(err)
	}
	copy(body, "XXXXX")
	headers["h"] = "changed"
	ds, err := ch.Consume("q", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := <-ds
	if string(d.Body) != "first" || d.Headers["h"] != "first" {
		t.Fatalf("got body %q header %v", d.Body, d.Headers["h"])
	}
}

// TestConcurrentTraffic: publishers, competing consumers that nack some
// deliveries back, channels closing mid-way; every message is acked once
// in the end. Run with -race.
func TestConcurrentTraffic(t *testing.T) {
	b := newBroker(t)
	setup := channel(t, dial(t, b))
	if err := setup.ExchangeDeclare("events", amqp091.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := setup.QueueDeclare("work", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := setup.QueueBind("work", "job.#", "events", false, nil); err != nil {
		t.Fatal(err)
	}
	const publishers, perPublisher, consumers = 4, 500, 4
	var mu sync.Mutex
	acked := map[string]int{}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i := range consumers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := b.Dial(fmt.Sprint("consumer ", i))
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			for round := 0; ; round++ {
				ch, err := c.Channel()
				if err != nil {
					t.Error(err)
					return
				}
				_ = ch.Qos(10, 0, false)
				ds, err := ch.Consume("work", "", false, false, false, false, nil)
				if err != nil {
					t.Error(err)
					return
				}
				// Each round handles some deliveries, then drops the channel
				// with whatever it holds unacked.
				for n := 0; n < 100+i*37; n++ {
					var d amqp091.Delivery
					var ok bool
					select {
					case d, ok = <-ds:
						if !ok {
							t.Error("deliveries closed under a consumer")
							return
						}
					case <-done:
						_ = ch.Close()
						return
					}
					if n%7 == 3 {
						_ = d.Nack(false, true)
						continue
					}
					mu.Lock()
					acked[d.MessageId]++
					mu.Unlock()
					_ = d.Ack(false)
				}
				_ = ch.Close()
			}
		}()
	}
	var pubs sync.WaitGroup
	for p := range publishers {
		pubs.Add(1)
		go func() {
			defer pubs.Done()
			c, err := b.Dial(fmt.Sprint("publisher ", p))
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			ch, _ := c.Channel()
			_ = ch.Confirm(false)
			for i := range perPublisher {
				id := fmt.Sprintf("p%d-%d", p, i)
				conf, err := ch.Publish(context.Background(), "events", "job."+id, false, amqp091.Publishing{MessageId: id})
				if err != nil || !conf.Acked() {
					t.Errorf("publish %s: %v", id, err)
					return
				}
			}
		}()
	}
	pubs.Wait()
	deadline := time.Now().Add(wait)
	for {
		mu.Lock()
		n := len(acked)
		mu.Unlock()
		if n == publishers*perPublisher {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d messages acked", n, publishers*perPublisher)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(done)
	wg.Wait()
	// A message may be acked twice only if it was redelivered after its
	// channel closed while the ack was in flight; here acks precede closes
	// on the same goroutine, so exactly once.
	for id, n := range acked {
		if n != 1 {
			t.Errorf("%s acked %d times", id, n)
		}
	}
}
