package membroker

import (
	"strings"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/broker/brokertest"
)

// TestTopicMatchTable checks the matcher alone against the table the
// conformance suite runs against RabbitMQ.
func TestTopicMatchTable(t *testing.T) {
	for _, c := range brokertest.TopicCases {
		if got := topicMatch(splitKey(c.Pattern), splitKey(c.Key)); got != c.Match {
			t.Errorf("pattern %q, key %q: %v, want %v", c.Pattern, c.Key, got, c.Match)
		}
	}
}

// TestTopicMatchManyHashesIsFast: a pattern of many '#' against a long key
// that does not match must not take exponential time.
func TestTopicMatchManyHashesIsFast(t *testing.T) {
	pattern := splitKey(strings.Repeat("#.", 30) + "z")
	key := splitKey(strings.Repeat("a.", 200) + "b")
	start := time.Now()
	if topicMatch(pattern, key) {
		t.Fatal("matched")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("took %v", d)
	}
}

// FuzzTopicMatch: '#' matches every key, and a key without wildcards
// matches itself.
func FuzzTopicMatch(f *testing.F) {
	f.Add("a.b")
	f.Add("")
	f.Add("..")
	f.Fuzz(func(t *testing.T, key string) {
		if !topicMatch(splitKey("#"), splitKey(key)) {
			t.Fatalf("# did not match %q", key)
		}
		if !strings.ContainsAny(key, "*#") && !topicMatch(splitKey(key), splitKey(key)) {
			t.Fatalf("%q does not match itself as a pattern", key)
		}
	})
}
