package main

import (
	"math/rand/v2"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/sandbox"
)

// A garbage body on product.create lands in <name>.dead; the worker goes on.
func TestPoisonIsDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	name := sandbox.Name("cat")
	base, _ := e.catalog(name, false)

	conn, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Publish(e.topology.EventsExchange, "product.create", false, false, amqp091.Publishing{
		ContentType: "application/json", Body: []byte(`{"not":"an event"`),
		Headers: amqp091.Table{"x-weird": int32(7), "nested": amqp091.Table{"a": "b"}},
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "poison in the dead-letter queue", func() bool {
		q, err := ch.QueueDeclarePassive(name+".dead", true, false, false, false, nil)
		return err == nil && q.Messages == 1
	})
	ids := e.createProducts(t, "after-poison", 3)
	e.randomCommands(t, ids, 10, rand.New(rand.NewPCG(5, 6)))
	waitConverged(t, e, base, 30*time.Second)
}

// The catalog killed with SIGKILL mid-stream and restarted converges.
func TestCatalogKilledMidStreamConverges(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.createProducts(t, "kill", 30)
	catalogEnv := map[string]string{"DATABASE_URL": sandbox.Postgres(t), "CATALOG_NAME": sandbox.Name("cat")}
	sandbox.DeleteLater(t, []string{catalogEnv["CATALOG_NAME"] + ".live", catalogEnv["CATALOG_NAME"] + ".replay", catalogEnv["CATALOG_NAME"] + ".dead"}, []string{catalogEnv["CATALOG_NAME"] + ".dead"})
	p := e.process("catalog", catalogEnv)

	done := make(chan struct{})
	go func() {
		defer close(done)
		e.randomCommands(t, ids, 400, rand.New(rand.NewPCG(9, 9)))
	}()
	// Kill it while events flow, then start it again on the same queues.
	eventually(t, 20*time.Second, "events flowing", func() bool {
		var st struct {
			Applied int64 `json:"applied"`
		}
		call(t, "GET", p.base+"/catalog/status", "", &st)
		return st.Applied > 60
	})
	p.kill()
	p = e.process("catalog", catalogEnv)
	<-done
	waitConverged(t, e, p.base, 60*time.Second)
}
