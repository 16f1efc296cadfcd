package brokertest

import (
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/broker"
)

var consumingCases = []testCase{
	{"CompetingConsumersShare", testCompetingConsumers},
	{"PrefetchBoundsUnacked", testPrefetch},
	{"GlobalPrefetchBoundsTheChannel", testGlobalPrefetch},
	{"OrderPreservedForOneConsumer", testOrder},
	{"SlowConsumerDoesNotBlockPublisher", testSlowConsumer},
	{"DeliveryTagsPerChannel", testDeliveryTags},
	{"CancelClosesDeliveries", testCancel},
	{"ExclusiveConsumer", testExclusiveConsumer},
	{"ReusedConsumerTagClosesConnection", testReusedConsumerTag},
	{"PrefetchSizeClosesConnection", testPrefetchSize},
}

// testCompetingConsumers: two consumers of one queue share its messages,
// each message going to exactly one of them.
func testCompetingConsumers(t *testing.T, e *env) {
	q := e.queue("q", nil)
	var feeds []<-chan amqp091.Delivery
	for i := range 2 {
		ch := e.channel()
		if err := ch.Qos(5, 0, false); err != nil {
			t.Fatal(err)
		}
		feeds = append(feeds, consume(t, ch, q, fmt.Sprintf("c%d", i)))
	}
	const n = 200
	pub := e.confirmChannel()
	var cs []broker.Confirmation
	for i := range n {
		cs = append(cs, publish(t, pub, "", q, false, msg(strconv.Itoa(i))))
	}
	confirmed(t, cs...)
	seen := map[string]int{}
	per := make([]int, 2)
	deadline := time.After(waitLong)
	for len(seen) < n {
		select {
		case d := <-feeds[0]:
			seen[d.MessageId]++
			per[0]++
			_ = d.Ack(false)
		case d := <-feeds[1]:
			seen[d.MessageId]++
			per[1]++
			_ = d.Ack(false)
		case <-deadline:
			t.Fatalf("received %d distinct of %d", len(seen), n)
		}
	}
	for id, c := range seen {
		if c != 1 {
			t.Errorf("message %s delivered %d times", id, c)
		}
	}
	if per[0] == 0 || per[1] == 0 {
		t.Errorf("one consumer got everything: %v", per)
	}
	if per[0]+per[1] != n {
		t.Errorf("%d deliveries for %d messages", per[0]+per[1], n)
	}
}

// testPrefetch: with Qos 3 a consumer holds at most 3 unacked deliveries;
// each ack lets one more through.
func testPrefetch(t *testing.T, e *env) {
	q := e.queue("q", nil)
	pub := e.confirmChannel()
	var cs []broker.Confirmation
	for i := range 10 {
		cs = append(cs, publish(t, pub, "", q, false, msg(strconv.Itoa(i))))
	}
	confirmed(t, cs...)
	ch := e.channel()
	if err := ch.Qos(3, 0, false); err != nil {
		t.Fatal(err)
	}
	ds := consume(t, ch, q, "c")
	got := receive(t, ds, 3)
	e.awaitReady(q, 7)
	quiet(t, ds)
	if err := got[0].Ack(false); err != nil {
		t.Fatal(err)
	}
	next := receive(t, ds, 1)[0]
	if next.MessageId != "3" {
		t.Fatalf("after one ack got %q, want 3", next.MessageId)
	}
	e.awaitReady(q, 6)
	quiet(t, ds)
}

// testGlobalPrefetch: Qos with global bounds the unacked deliveries of all
// the channel's consumers together (RabbitMQ's reading of the flag).
func testGlobalPrefetch(t *testing.T, e *env) {
	q1, q2 := e.queue("q1", nil), e.queue("q2", nil)
	pub := e.confirmChannel()
	var cs []broker.Confirmation
	for i := range 4 {
		cs = append(cs, publish(t, pub, "", q1, false, msg("a"+strconv.Itoa(i))), publish(t, pub, "", q2, false, msg("b"+strconv.Itoa(i))))
	}
	confirmed(t, cs...)
	ch := e.channel()
	if err := ch.Qos(3, 0, true); err != nil {
		t.Fatal(err)
	}
	ds1, ds2 := consume(t, ch, q1, "c1"), consume(t, ch, q2, "c2")
	receiveAny(t, 3, ds1, ds2)
	quiet(t, ds1)
	quiet(t, ds2)
	ready := func() int { r1, _ := e.counts(q1); r2, _ := e.counts(q2); return r1 + r2 }
	if r := ready(); r != 5 {
		t.Fatalf("%d messages ready, want 5 (3 of 8 delivered)", r)
	}
	if err := ch.Ack(0, true); err != nil { // 0 with multiple: everything
		t.Fatal(err)
	}
	receiveAny(t, 3, ds1, ds2)
	if !eventually(func() bool { return ready() == 2 }) {
		t.Fatalf("%d messages ready after acking all, want 2", ready())
	}
}

// receiveAny receives n deliveries from a or b.
func receiveAny(t *testing.T, n int, a, b <-chan amqp091.Delivery) {
	t.Helper()
	deadline := time.After(waitLong)
	for got := 0; got < n; got++ {
		select {
		case <-a:
		case <-b:
		case <-deadline:
			t.Fatalf("received %d of %d deliveries", got, n)
		}
	}
}

// testOrder: one consumer gets one publisher's messages in order.
func testOrder(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.channel()
	if err := ch.Qos(50, 0, false); err != nil {
		t.Fatal(err)
	}
	ds := consume(t, ch, q, "c")
	pub := e.channel()
	const n = 1000
	for i := range n {
		publish(t, pub, "", q, false, msg(strconv.Itoa(i)))
	}
	for i := range n {
		d := receive(t, ds, 1)[0]
		if d.MessageId != strconv.Itoa(i) {
			t.Fatalf("delivery %d is %q", i, d.MessageId)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
}

// testSlowConsumer: a consumer that holds its one delivery forever does not
// hold the publisher back; the rest wait in the queue.
func testSlowConsumer(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.channel()
	if err := ch.Qos(1, 0, false); err != nil {
		t.Fatal(err)
	}
	ds := consume(t, ch, q, "slow")
	pub := e.confirmChannel()
	const n = 3000
	body := make([]byte, 1024)
	start := time.Now()
	var cs []broker.Confirmation
	for i := range n {
		m := msg(strconv.Itoa(i))
		m.Body = body
		cs = append(cs, publish(t, pub, "", q, false, m))
	}
	confirmed(t, cs...)
	t.Logf("%d messages of 1 KiB published and confirmed in %v past a consumer that never acks", n, time.Since(start))
	receive(t, ds, 1)
	e.awaitReady(q, n-1)
}

// testDeliveryTags: tags are per channel, from 1, increasing across the
// channel's consumers.
func testDeliveryTags(t *testing.T, e *env) {
	q1, q2 := e.queue("q1", nil), e.queue("q2", nil)
	pub := e.confirmChannel()
	var cs []broker.Confirmation
	for i := range 3 {
		cs = append(cs, publish(t, pub, "", q1, false, msg("a"+strconv.Itoa(i))), publish(t, pub, "", q2, false, msg("b"+strconv.Itoa(i))))
	}
	confirmed(t, cs...)
	ch := e.channel()
	ds1, ds2 := consume(t, ch, q1, "c1"), consume(t, ch, q2, "c2")
	var tags []uint64
	for _, ds := range []<-chan amqp091.Delivery{ds1, ds2} {
		var last uint64
		for _, d := range receive(t, ds, 3) {
			if d.DeliveryTag <= last {
				t.Errorf("consumer %s: tag %d after %d", d.ConsumerTag, d.DeliveryTag, last)
			}
			last = d.DeliveryTag
			tags = append(tags, d.DeliveryTag)
		}
	}
	slices.Sort(tags)
	if !slices.Equal(tags, []uint64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("tags %v, want 1..6", tags)
	}
	if err := ch.Ack(6, true); err != nil {
		t.Fatal(err)
	}
	q3 := e.queue("q3", nil)
	confirmed(t, publish(t, pub, "", q3, false, msg("c")))
	if d := receive(t, consume(t, e.channel(), q3, "other"), 1)[0]; d.DeliveryTag != 1 {
		t.Fatalf("first tag on a new channel is %d, want 1", d.DeliveryTag)
	}
}

// testCancel: Cancel closes the consumer's deliveries; the queue keeps what
// arrives later.
func testCancel(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch := e.channel()
	ds := consume(t, ch, q, "c")
	if err := ch.Cancel("c", false); err != nil {
		t.Fatal(err)
	}
	awaitClosed(t, ds)
	if _, consumers := e.counts(q); consumers != 0 {
		t.Fatalf("%d consumers after cancel", consumers)
	}
	pub := e.confirmChannel()
	confirmed(t, publish(t, pub, "", q, false, msg("m")))
	e.awaitReady(q, 1)
	if err := ch.Cancel("unknown", false); err != nil {
		t.Fatalf("cancel of an unknown tag: %v", err)
	}
	if ch.IsClosed() {
		t.Fatal("channel closed by a cancel")
	}
}

// testExclusiveConsumer: a second consumer of a queue with an exclusive
// one is refused (403), and so is an exclusive one next to others.
func testExclusiveConsumer(t *testing.T, e *env) {
	q := e.queue("q", nil)
	ch1 := e.channel()
	if _, err := ch1.Consume(q, "x", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	ch2 := e.channel()
	_, err := ch2.Consume(q, "y", false, false, false, false, nil)
	expectCode(t, err, amqp091.AccessRefused)
	if err := ch1.Cancel("x", false); err != nil {
		t.Fatal(err)
	}
	consume(t, ch1, q, "z")
	_, err = e.channel().Consume(q, "w", false, true, false, false, nil)
	expectCode(t, err, amqp091.AccessRefused)
}

// testReusedConsumerTag: a consumer tag reused on a channel is a
// connection exception (530).
func testReusedConsumerTag(t *testing.T, e *env) {
	q := e.queue("q", nil)
	c := e.connect()
	closes := c.NotifyClose(make(chan *amqp091.Error, 1))
	ch := e.channelOn(c)
	consume(t, ch, q, "t")
	_, err := ch.Consume(q, "t", false, false, false, false, nil)
	expectCode(t, err, amqp091.NotAllowed)
	awaitError(t, closes, amqp091.NotAllowed)
	if !c.IsClosed() {
		t.Fatal("connection open after a connection exception")
	}
}

// testPrefetchSize: RabbitMQ does not implement a prefetch size; asking for
// one is a connection exception (540).
func testPrefetchSize(t *testing.T, e *env) {
	c := e.connect()
	closes := c.NotifyClose(make(chan *amqp091.Error, 1))
	expectCode(t, e.channelOn(c).Qos(1, 4096, false), amqp091.NotImplemented)
	awaitError(t, closes, amqp091.NotImplemented)
}
