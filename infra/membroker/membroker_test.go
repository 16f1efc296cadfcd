package membroker_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/broker"
	"github.com/statemill/statemill/infra/broker/brokertest"
	"github.com/statemill/statemill/infra/membroker"
)

// TestMain fails the package if goroutines of the broker or of its tests
// outlive the tests: every test closes its broker, and a closed broker
// must leave nothing running. (Counting only those keeps the testing and
// fuzzing machinery's own goroutines out of it.)
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := awaitNoGoroutines(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines leaked:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// awaitNoGoroutines waits until no goroutine but the caller runs code of
// this package, and returns the stacks of those that still do in time.
func awaitNoGoroutines(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		buf := make([]byte, 1<<20)
		var leaked []string
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "statemill/infra/membroker") && !strings.Contains(g, "awaitNoGoroutines") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// newBroker starts a broker that t closes when it ends.
func newBroker(t *testing.T) *membroker.Broker {
	t.Helper()
	b, err := membroker.New(membroker.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// TestConformance runs the shared broker suite, each case on a broker of
// its own.
func TestConformance(t *testing.T) {
	brokertest.Run(t, func(t *testing.T) broker.Dialer { return newBroker(t).Dialer() })
}

// TestConformanceSharedBroker runs it again with every case on one broker,
// as the RabbitMQ run shares one: names must isolate the cases.
func TestConformanceSharedBroker(t *testing.T) {
	b, err := membroker.New(membroker.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	brokertest.Run(t, func(*testing.T) broker.Dialer { return b.Dialer() })
}

func TestConfig(t *testing.T) {
	if err := (membroker.Config{}).Validate(); err != nil {
		t.Fatalf("zero config: %v", err)
	}
	for _, c := range []membroker.Config{{ChannelMax: -1}, {ChannelMax: 70000}, {MaxMessageBytes: -1}} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate accepted %+v", c)
		}
		if _, err := membroker.New(c); err == nil {
			t.Errorf("New accepted %+v", c)
		}
	}
}

func TestDialAfterCloseFails(t *testing.T) {
	b := newBroker(t)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Dial("late"); err == nil || !strings.Contains(err.Error(), "late") {
		t.Fatalf("dial after close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}
