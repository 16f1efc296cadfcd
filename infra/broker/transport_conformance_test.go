package broker_test

import (
	"os"
	"testing"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/broker/brokertest"
	"github.com/statemill/statemill/infra/sandbox"
)

// TestTransportConformance runs the broker conformance suite against the
// local RabbitMQ through broker.Dial: it is the reference the in-process
// broker (infra/membroker) is held to. In CI an unreachable RabbitMQ fails
// the test; elsewhere it skips with the reason.
func TestTransportConformance(t *testing.T) {
	url := os.Getenv("AMQP_URL")
	if url == "" {
		url = sandbox.AMQPURL()
	}
	conn, err := broker.Dial(url, "statemill conformance probe")
	if err != nil {
		if sandbox.CI() {
			t.Fatalf("RabbitMQ unreachable at %s, and CI=true: the conformance suite must run: %v", url, err)
		}
		t.Skipf("RabbitMQ unreachable at %s (start it with `rabbitmq-server -detached`, or set AMQP_URL): %v", url, err)
	}
	_ = conn.Close()
	dialer := broker.AMQPDialer(url)
	brokertest.Run(t, func(*testing.T) broker.Dialer { return dialer })
}
