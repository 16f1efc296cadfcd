package broker_test

import (
	"testing"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/broker/brokertest"
	"github.com/statemill/statemill/infra/sandbox"
)

// TestTransportConformance runs the broker conformance suite against the
// local RabbitMQ through broker.Dial: it is the reference the in-process
// broker (infra/membroker) is held to. An unreachable RabbitMQ fails it.
func TestTransportConformance(t *testing.T) {
	url, _ := sandbox.Broker(t)
	dialer := broker.AMQPDialer(url)
	brokertest.Run(t, func(*testing.T) broker.Dialer { return dialer })
}
