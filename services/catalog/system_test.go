package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/sandbox"
)

// randomCommands sends n random commands over m products through the
// products API and returns how many were accepted.
func (e *env) randomCommands(t *testing.T, ids []string, n int, rng *rand.Rand) int {
	t.Helper()
	accepted := 0
	for i := 0; i < n; i++ {
		id := ids[rng.IntN(len(ids))]
		var status int
		switch r := rng.IntN(20); {
		case r == 0:
			status = call(t, "DELETE", e.products+"/api/products/"+id, "", nil)
		case r < 11:
			status = call(t, "PUT", e.products+"/api/products/"+id, fmt.Sprintf(`{"adjust_inventory":%d}`, 1+rng.IntN(5)), nil)
		default:
			status = call(t, "PUT", e.products+"/api/products/"+id, fmt.Sprintf(`{"adjust_inventory":%d}`, -1-rng.IntN(5)), nil)
		}
		if status == http.StatusOK {
			accepted++
		}
	}
	return accepted
}

func (e *env) createProducts(t *testing.T, prefix string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		var p state
		if status := call(t, "POST", e.products+"/api/products", fmt.Sprintf(`{"name":"%s-%d","price":%d,"initial_inventory":%d}`, prefix, i, 100+i, i%3), &p); status != http.StatusCreated {
			t.Fatalf("create: %d", status)
		}
		ids[i] = p.ID
	}
	return ids
}

func waitConverged(t *testing.T, e *env, base string, timeout time.Duration) {
	t.Helper()
	var want, got map[string]state
	deadline := time.Now().Add(timeout)
	for {
		want = e.writeModel(t)
		got, _ = catalogModel(t, base)
		if converged(want, got) {
			return
		}
		if time.Now().After(deadline) {
			diff := 0
			for id, w := range want {
				if got[id] != w {
					diff++
					if diff <= 5 {
						t.Logf("product %s: write model %+v, catalog %+v", id, w, got[id])
					}
				}
			}
			t.Fatalf("catalog did not converge within %s: %d products differ (write model %d, catalog %d)", timeout, diff, len(want), len(got))
		}
		<-time.After(50 * time.Millisecond)
	}
}

// 1,000 random commands on 50 products: the catalog ends equal to the write
// model on id, state, inventory and version.
func TestConvergence(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	base, _ := e.catalog(sandbox.Name("cat"), false)
	ids := e.createProducts(t, "conv", 50)
	rng := rand.New(rand.NewPCG(1, 2))
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		seed := rng.Uint64()
		go func() {
			defer wg.Done()
			e.randomCommands(t, ids, 250, rand.New(rand.NewPCG(seed, 7)))
		}()
	}
	wg.Wait()
	waitConverged(t, e, base, 60*time.Second)

	var st struct {
		Applied     int64 `json:"applied"`
		LagMessages int64 `json:"lag_messages"`
	}
	call(t, "GET", base+"/catalog/status", "", &st)
	if st.Applied == 0 {
		t.Fatalf("status reports nothing applied: %+v", st)
	}
	var stats struct {
		Products int64            `json:"products"`
		ByState  map[string]int64 `json:"by_state"`
	}
	call(t, "GET", base+"/catalog/stats", "", &stats)
	var sum int64
	for _, n := range stats.ByState {
		sum += n
	}
	if stats.Products != 50 || sum != 50 {
		t.Fatalf("stats %+v", stats)
	}
}

// A catalog started after the products exist rebuilds itself from a replay
// routed only to it: a second consumer's queues and the live bindings see
// nothing of it.
func TestReplayReachesOnlyItsConsumer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.createProducts(t, "iso", 20)
	e.randomCommands(t, ids, 60, rand.New(rand.NewPCG(3, 4)))
	var history int64
	e.sql(t, `SELECT count(*) FROM history`, &history)

	// A second consumer builds itself, then stops: its durable queues stay
	// bound and would keep anything routed to them.
	second := sandbox.Name("cat")
	secondBase, stopSecond := e.catalog(second, false)
	waitRebuilt(t, secondBase, history)
	stopSecond()

	conn, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	count := func(binding string) *atomic.Int64 {
		q, err := ch.QueueDeclare("", false, true, true, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := ch.QueueBind(q.Name, binding, e.topology.EventsExchange, false, nil); err != nil {
			t.Fatal(err)
		}
		msgs, err := ch.Consume(q.Name, "", true, true, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		// Late live events may still arrive here (the relay can lag behind
		// the commands above); what must never arrive is a replayed one.
		var n atomic.Int64
		go func() {
			for d := range msgs {
				if _, replayed := d.Headers["replay_id"]; replayed {
					n.Add(1)
				}
			}
		}()
		return &n
	}
	live, other := count("product.#"), count("other.product.#")

	base, _ := e.catalog(sandbox.Name("cat"), false) // first start: rebuilds by replay
	waitRebuilt(t, base, history)
	waitConverged(t, e, base, 30*time.Second)

	if n := live.Load(); n != 0 {
		t.Fatalf("a consumer bound to product.# received %d replayed messages", n)
	}
	if n := other.Load(); n != 0 {
		t.Fatalf("a consumer of another prefix received %d replayed messages", n)
	}
	// The stopped consumer's replay queue stays bound to its own prefix: the
	// first catalog's replay must not have reached it.
	info, err := ch.QueueDeclarePassive(second+".replay", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": second + ".dead"})
	if err != nil {
		t.Fatalf("inspect %s.replay: %v", second, err)
	}
	if info.Messages != 0 {
		t.Fatalf("%s.replay holds %d messages of another consumer's replay", second, info.Messages)
	}
}

// waitRebuilt waits for a completed rebuild that received every one of want events.
func waitRebuilt(t *testing.T, base string, want int64) {
	t.Helper()
	var st struct {
		Rebuild struct {
			State    string `json:"state"`
			Expected int64  `json:"expected"`
			Received int64  `json:"received"`
			Error    string `json:"error"`
		} `json:"rebuild"`
	}
	eventually(t, 60*time.Second, "rebuild completed", func() bool {
		call(t, "GET", base+"/catalog/status", "", &st)
		if st.Rebuild.State == "failed" {
			t.Fatalf("rebuild failed: %s", st.Rebuild.Error)
		}
		return st.Rebuild.State == "completed"
	})
	if st.Rebuild.Expected != want || st.Rebuild.Received != want {
		t.Fatalf("rebuild received %d of %d events; history has %d", st.Rebuild.Received, st.Rebuild.Expected, want)
	}
}

func (e *env) sql(t *testing.T, query string, dest ...any) {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(context.Background(), query).Scan(dest...); err != nil {
		t.Fatal(err)
	}
}
