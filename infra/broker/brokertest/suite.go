// Package brokertest is the conformance suite of broker.Conn, in the spirit
// of Watermill's shared pub/sub tests: the same cases run against RabbitMQ
// (through broker.Dial) and against the in-process broker of the embedded
// mode, so that the in-process one cannot drift from the real one. Where
// they disagree, RabbitMQ is right and the other is fixed.
//
// Each case isolates itself with exchange and queue names of its own, and
// deletes what it declared when it ends, so the suite can share a broker
// with other tests running in parallel.
package brokertest

import (
	"testing"

	"github.com/statemill/statemill/infra/broker"
)

type testCase struct {
	name string
	run  func(t *testing.T, e *env)
}

// Run runs the whole suite, topic matching included, as parallel subtests.
// dial returns the broker under test for one subtest; it may start a broker
// per subtest and stop it in t.Cleanup.
func Run(t *testing.T, dial func(t *testing.T) broker.Dialer) {
	t.Run("TopicMatching", func(t *testing.T) {
		t.Parallel()
		RunTopicMatching(t, dial)
	})
	for _, group := range [][]testCase{routingCases, consumingCases, ackingCases, declaringCases, messageCases} {
		for _, tc := range group {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				tc.run(t, newEnv(t, dial))
			})
		}
	}
}

// RunTopicMatching runs the topic exchange cases only: TopicCases, a queue
// bound several times getting a message once, and unbinding.
func RunTopicMatching(t *testing.T, dial func(t *testing.T) broker.Dialer) {
	for _, tc := range topicCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, newEnv(t, dial))
		})
	}
}
