// Package sandbox gives each test its own PostgreSQL database and its own
// namespace on the shared RabbitMQ broker, so packages can run in parallel
// against the real services. A service that cannot be reached fails the
// test: an integration test never skips itself into a green run.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

// AdminDatabaseURL is the server-level URL tests create their databases from
// (env TEST_DATABASE_URL).
func AdminDatabaseURL() string { return envOr("TEST_DATABASE_URL", defaultDatabaseURL) }

// AMQPURL is the broker tests use (env TEST_AMQP_URL).
func AMQPURL() string { return envOr("TEST_AMQP_URL", defaultAMQPURL) }

// Name returns a short random lowercase name with the given prefix, unique
// enough to isolate one test's database, exchanges and queues.
func Name(prefix string) string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Postgres creates an empty database for t, drops it when t ends, and
// returns its URL.
func Postgres(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	admin := AdminDatabaseURL()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("sandbox: PostgreSQL unreachable at %s (start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): %v", admin, err)
	}
	defer conn.Close(context.Background())
	name := Name("statemill_t_")
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("sandbox: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Logf("sandbox: drop database %s: %v", name, err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Logf("sandbox: drop database %s: %v", name, err)
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("sandbox: parse %s: %v", admin, err)
	}
	u.Path = "/" + name
	return u.String()
}

// Broker checks that RabbitMQ is reachable and returns its URL and a fresh
// namespace (a lowercase word) for t's exchanges and queues. Objects the test
// declares under the namespace are deleted when t ends, as far as DeleteLater
// was told about them.
func Broker(t testing.TB) (amqpURL, namespace string) {
	t.Helper()
	amqpURL = AMQPURL()
	conn, err := amqp091.DialConfig(amqpURL, amqp091.Config{Dial: amqp091.DefaultDial(5 * time.Second)})
	if err != nil {
		t.Fatalf("sandbox: RabbitMQ unreachable at %s (start it with `rabbitmq-server -detached`): %v", amqpURL, err)
	}
	_ = conn.Close()
	return amqpURL, Name("t")
}

// DeleteLater deletes the named queues and exchanges when t ends, so tests
// leave the shared broker as they found it.
func DeleteLater(t testing.TB, queues, exchanges []string) {
	t.Helper()
	t.Cleanup(func() {
		conn, err := amqp091.Dial(AMQPURL())
		if err != nil {
			return
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			return
		}
		defer ch.Close()
		for _, q := range queues {
			_, _ = ch.QueueDelete(q, false, false, false)
		}
		for _, x := range exchanges {
			_ = ch.ExchangeDelete(x, false, false)
		}
	})
}

// CI reports whether the tests run in CI (CI=true).
func CI() bool { return strings.EqualFold(os.Getenv("CI"), "true") }

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}
