package brokertest

import (
	"fmt"
	"slices"
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// TopicCase is one binding pattern and routing key, and whether RabbitMQ
// routes the key to a queue bound with the pattern.
type TopicCase struct {
	Pattern, Key string
	Match        bool
}

// TopicCases are RabbitMQ's topic rules as observed on RabbitMQ 3.10: '*'
// is exactly one word, '#' zero or more, words are split on every '.'
// (empty words count), and the key "" has no word at all. Exported so an
// implementation's matcher can be unit-tested against the same table.
var TopicCases = []TopicCase{
	// '#' alone matches everything, the empty key included.
	{"#", "", true},
	{"#", "a", true},
	{"#", "a.b.c", true},
	{"#", ".", true},
	// '*' is exactly one word; "" has none, "." has two empty ones.
	{"*", "a", true},
	{"*", "", false},
	{"*", "a.b", false},
	{"*", ".", false},
	// Plain words match exactly, case-sensitively.
	{"", "", true},
	{"", "a", false},
	{"a", "a", true},
	{"a", "", false},
	{"a", "a.b", false},
	{"a.b", "a.b", true},
	{"a.b", "a.B", false},
	// '#.x': x last, anything before.
	{"#.x", "x", true},
	{"#.x", "a.x", true},
	{"#.x", "a.b.x", true},
	{"#.x", "x.a", false},
	{"#.x", "ax", false},
	// 'x.#': x first, anything after, nothing included.
	{"x.#", "x", true},
	{"x.#", "x.a", true},
	{"x.#", "x.a.b", true},
	{"x.#", "x.", true},
	{"x.#", "y.x", false},
	{"x.#", "xa", false},
	// 'x.#.y': zero or more words between.
	{"x.#.y", "x.y", true},
	{"x.#.y", "x.a.y", true},
	{"x.#.y", "x.a.b.y", true},
	{"x.#.y", "x.y.y", true},
	{"x.#.y", "x.y.z", false},
	// '*.*': exactly two words, empty ones too.
	{"*.*", "a.b", true},
	{"*.*", ".", true},
	{"*.*", "a.", true},
	{"*.*", "a", false},
	{"*.*", "a.b.c", false},
	// 'a.*.#': a, one word, then anything.
	{"a.*.#", "a.b", true},
	{"a.*.#", "a.b.c.d", true},
	{"a.*.#", "a", false},
	{"a.*.#", "b.a.c", false},
	// Empty words are words.
	{"a..b", "a..b", true},
	{"a..b", "a.b", false},
	{"a.*.b", "a..b", true},
	{"a.#.b", "a..b", true},
	{"a.", "a.", true},
	{"a.", "a", false},
	{"*.", "a.", true},
	{".*", ".a", true},
	// Several '#'.
	{"#.#", "", true},
	{"#.#", "a.b", true},
	{"*.#", "", false},
	{"*.#", "a", true},
	{"#.*", "", false},
	{"#.*", "a.b", true},
	{"#.a.#", "a", true},
	{"#.a.#", "x.a.y", true},
	{"#.a.#", "b", false},
	{"a.#.b.#.c", "a.b.c.b.c", true},
	{"a.#.b.#.c", "a.c", false},
	// The shapes statemill binds: <entity>.# live, <prefix>.<entity>.# replay.
	{"order.#", "order.create", true},
	{"order.#", "catalog.order.create", false},
	{"order.#", "orders.create", false},
	{"catalog.order.#", "catalog.order.create", true},
	{"catalog.order.#", "ui-7f3a.order.create", false},
}

var topicCases = []testCase{
	{"Table", testTopicTable},
	{"SeveralBindingsDeliverOnce", testTopicDeliverOnce},
}

// testTopicTable binds one queue per pattern, publishes every key once,
// and reads each queue up to a fence.
func testTopicTable(t *testing.T, e *env) {
	x := e.exchange("topic", amqp091.ExchangeTopic, nil)
	queues := map[string]string{}
	var patterns, keys []string
	for _, c := range TopicCases {
		if _, ok := queues[c.Pattern]; !ok {
			queues[c.Pattern] = e.queue(fmt.Sprintf("q%d", len(queues)), nil)
			e.bind(queues[c.Pattern], c.Pattern, x)
			patterns = append(patterns, c.Pattern)
		}
		if !slices.Contains(keys, c.Key) {
			keys = append(keys, c.Key)
		}
	}
	ch := e.channel()
	for _, k := range keys {
		publish(t, ch, x, k, false, amqp091.Publishing{MessageId: "key:" + k})
	}
	fences := map[string]string{}
	for _, p := range patterns {
		fences[p] = fence(t, ch, queues[p])
	}
	got := map[string][]string{}
	for _, p := range patterns {
		got[p] = untilFence(t, consumeAuto(t, e.channel(), queues[p]), fences[p])
	}
	for _, c := range TopicCases {
		routed := slices.Contains(got[c.Pattern], "key:"+c.Key)
		if routed != c.Match {
			t.Errorf("pattern %q, key %q: routed %v, want %v", c.Pattern, c.Key, routed, c.Match)
		}
	}
	for _, p := range patterns {
		for _, id := range got[p] {
			if n := countOf(got[p], id); n != 1 {
				t.Errorf("pattern %q got %s %d times", p, id, n)
			}
		}
	}
}

// testTopicDeliverOnce: a queue bound by several matching patterns (one of
// them twice) gets a message once; after an unbind, only the remaining
// bindings route.
func testTopicDeliverOnce(t *testing.T, e *env) {
	x := e.exchange("topic", amqp091.ExchangeTopic, nil)
	q := e.queue("q", nil)
	for _, p := range []string{"a.*", "*.b", "#", "a.b", "a.b"} {
		e.bind(q, p, x)
	}
	ch := e.channel()
	ds := consumeAuto(t, e.channel(), q)
	publish(t, ch, x, "a.b", false, msg("m1"))
	publish(t, ch, x, "z.z", false, msg("m2"))
	if got := untilFence(t, ds, fence(t, ch, q)); !slices.Equal(got, []string{"m1", "m2"}) {
		t.Fatalf("got %q, want [m1 m2] (each once)", got)
	}
	if err := e.setupChannel().QueueUnbind(q, "#", x, nil); err != nil {
		t.Fatalf("unbind: %v", err)
	}
	publish(t, ch, x, "z.z", false, msg("m3"))
	publish(t, ch, x, "a.z", false, msg("m4"))
	if got := untilFence(t, ds, fence(t, ch, q)); !slices.Equal(got, []string{"m4"}) {
		t.Fatalf("after unbinding #: got %q, want [m4]", got)
	}
}

func countOf(xs []string, x string) int {
	n := 0
	for _, y := range xs {
		if y == x {
			n++
		}
	}
	return n
}
