package outbox_test

import (
	"net/url"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/sandbox"
)

// The broker, or the database, drops the relay's connections in the middle
// of a batch: every event arrives and none is lost. After a broker cut the
// batch goes out again from its start (its confirms are lost); after a
// database cut it does unless the relay moved the offset over the confirmed
// batch on a fresh connection first.
func TestPipelinedRelaySurvivesACutMidBatch(t *testing.T) {
	t.Parallel()
	for _, cut := range []string{"broker", "database"} {
		t.Run(cut, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, false)
			tg := e.target()
			var proxy *sandbox.Proxy
			switch cut {
			case "broker":
				u, err := url.Parse(e.amqpURL)
				if err != nil {
					t.Fatal(err)
				}
				proxy = sandbox.NewProxy(t, u.Host)
				u.Host = proxy.Addr()
				tg.amqpURL = u.String()
			case "database":
				u, err := url.Parse(e.dbURL)
				if err != nil {
					t.Fatal(err)
				}
				proxy = sandbox.NewProxy(t, u.Host)
				u.Host = proxy.Addr()
				tg.pool = openPool(t, u.String(), 3)
			}

			// One batch holds every row, so a cut after the first delivery
			// and before the batch's commit is by construction in its middle.
			const n = 4000
			want := e.fill(t, n, 4, 20)
			r := kind("pipelined").build(t, tg, relayOptions{Pipelined: func(c *outbox.PipelinedConfig) {
				c.BatchSize = n
				c.BatchDeadline = 30 * time.Second // -race on a small box publishes slowly
			}})
			p := r.(*outbox.PipelinedRelay)
			startRelay(t, r)

			seen := map[string]int{}
			select {
			case d := <-e.deliveries:
				seen[d.d.MessageId]++
			case <-time.After(deliveryWait):
				t.Fatal("nothing was delivered")
			}
			proxy.Down()
			if s := p.Stats(); s.Batches != 0 {
				t.Fatalf("the batch was committed before the cut (%+v): the test did not cut it in the middle", s)
			}
			// Up only once the relay has tried, and failed, to come back.
			accepted := proxy.Accepted()
			if !eventually(t, deliveryWait, func() bool { return proxy.Accepted() > accepted }) {
				t.Fatal("the relay did not try to reconnect")
			}
			proxy.Up()

			// Every event arrives, the first one counted too.
			deadline := time.After(60 * time.Second)
			for len(seen) < len(want) {
				select {
				case d := <-e.deliveries:
					if !want[d.d.MessageId] {
						t.Fatalf("delivered %s, which is not an appended event", d.d.MessageId)
					}
					seen[d.d.MessageId]++
				case <-deadline:
					t.Fatalf("after 1m, %d of %d events never arrived", len(want)-len(seen), len(want))
				}
			}
			flush(t, r)
			dups := 0
			for id, k := range seen {
				if !want[id] {
					t.Fatalf("delivered %s, which is not an appended event", id)
				}
				dups += k - 1
			}
			s := p.Stats()
			t.Logf("%s cut: %d events, %d duplicates; stats %+v", cut, n, dups, s)
			if cut == "broker" && s.Reconnects < 1 {
				t.Errorf("Stats().Reconnects = %d, want at least 1", s.Reconnects)
			}
			// A broker cut loses the batch's confirms, so it goes out again.
			// After a database cut the relay may still move the offset over
			// the confirmed batch on a fresh connection (its turn's
			// connection died with the cut): then nothing repeats.
			if cut == "broker" && dups == 0 {
				t.Error("no event arrived twice: the cut batch was not published again from its start")
			}
		})
	}
}

// While it publishes, a batch transaction has no xid, so it does not hold
// back pg_snapshot_xmin, and with it every outbox reader in the cluster.
func TestPipelinedRelayHoldsNoXIDWhilePublishing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	const n = 3000
	want := e.fill(t, n, 3, 20)
	r := kind("pipelined").build(t, e.target(), relayOptions{Pipelined: func(c *outbox.PipelinedConfig) {
		c.BatchSize = n
		c.BatchDeadline = 30 * time.Second
	}})
	startRelay(t, r)
	ctx := testCtx(t)
	var samples, withXID int
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var xid *string
			err := e.store.Pool().QueryRow(ctx, `SELECT backend_xid::text FROM pg_stat_activity
				WHERE datname = current_database() AND state = 'idle in transaction'
				  AND query LIKE '%transaction_id::text AS xid%'`).Scan(&xid)
			if err == nil {
				samples++
				if xid != nil {
					withXID++
				}
			}
		}
	}()
	e.collectAll(t, want, 60*time.Second)
	close(stop)
	<-sampled
	t.Logf("%d samples of the batch transaction while it published, %d with an xid", samples, withXID)
	if samples == 0 {
		t.Fatal("never saw the batch transaction while it published")
	}
	if withXID > 0 {
		t.Errorf("the batch transaction had an xid in %d of %d samples while it published", withXID, samples)
	}
}

// Two relays of one consumer group take turns on the offsets row: every
// event is published once, in per-entity order, whichever relay sends it.
func TestTwoPipelinedRelaysShareOneOutbox(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	var relays []*outbox.PipelinedRelay
	for range 2 {
		tg := e.target()
		tg.pool = openPool(t, e.dbURL, 3)
		r := kind("pipelined").build(t, tg, relayOptions{Pipelined: func(c *outbox.PipelinedConfig) { c.BatchSize = 50 }})
		runRelay(t, r)
		relays = append(relays, r.(*outbox.PipelinedRelay))
	}

	const n = 2000
	want := e.fill(t, n, 8, 2) // small transactions while both relays run
	got := e.collect(t, n)
	for _, r := range relays {
		flush(t, r)
	}
	e.noMore(t)

	seen := map[string]bool{}
	last := map[string]int64{}
	for _, r := range got {
		id := r.d.MessageId
		if !want[id] {
			t.Fatalf("delivered %s, which is not an appended event", id)
		}
		if seen[id] {
			t.Fatalf("event %s published twice: the relays did not take turns", id)
		}
		seen[id] = true
		ev, err := envelope.Decode(r.d.Body)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Version != last[ev.EntityID]+1 {
			t.Fatalf("widget %s: version %d after %d", ev.EntityID, ev.Version, last[ev.EntityID])
		}
		last[ev.EntityID] = ev.Version
	}
	a, b := relays[0].Stats(), relays[1].Stats()
	t.Logf("relay 1 published %d in %d batches, relay 2 %d in %d", a.Published, a.Batches, b.Published, b.Batches)
	if a.Published+b.Published != n {
		t.Errorf("the relays published %d rows together, want exactly %d", a.Published+b.Published, n)
	}
}

// A deployment switches relays either way on the same offsets row: each
// relay picks up where the other stopped, losing and repeating nothing.
func TestRelaysInteroperateOnOneOffsetsRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	for phase, name := range []string{"forwarder", "pipelined", "forwarder", "pipelined"} {
		want := e.fill(t, 150, 3, 2)
		r := kind(name).build(t, e.target(), relayOptions{})
		stop := runRelay(t, r)
		for id, k := range e.collectAll(t, want, deliveryWait) {
			if k != 1 {
				t.Fatalf("phase %d (%s): event %s delivered %d times", phase, name, id, k)
			}
		}
		flush(t, r)
		stop()
		e.noMore(t)
	}
}

// Both kinds running at once on one offsets row (a rolling switch): the
// forwarder knows nothing of the pipelined relays' turns, so a batch may go
// out twice, but the compare-and-set on the offsets never moves them back
// and no event is lost.
func TestForwarderAndPipelinedRelayRunTogether(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	var relays []testRelay
	for _, name := range []string{"forwarder", "pipelined"} {
		tg := e.target()
		tg.pool = openPool(t, e.dbURL, 3)
		r := kind(name).build(t, tg, relayOptions{Pipelined: func(c *outbox.PipelinedConfig) { c.BatchSize = 50 }})
		runRelay(t, r)
		relays = append(relays, r)
	}
	const n = 1500
	want := e.fill(t, n, 6, 2)
	seen := e.collectAll(t, want, 60*time.Second)
	for _, r := range relays {
		flush(t, r)
	}
	dups := 0
	for _, k := range seen {
		dups += k - 1
	}
	s := relays[1].(*outbox.PipelinedRelay).Stats()
	t.Logf("%d events, %d duplicates; pipelined relay: %d published, %d batches lost the race", n, dups, s.Published, s.LostRaces)
}

// An idle relay sleeps on LISTEN and wakes on a command's NOTIFY, also
// after its listener connection dropped: with the fallback poll a minute
// away, only the notification can explain a delivery within seconds. Not
// parallel, as TestRelayIdleLatency.
func TestPipelinedRelayWakesOnNotify(t *testing.T) {
	e := newEnv(t, false)
	r := kind("pipelined").build(t, e.target(), relayOptions{Pipelined: func(c *outbox.PipelinedConfig) {
		c.IdleAfter = time.Millisecond
		c.IdlePollInterval = time.Minute
	}})
	runRelay(t, r)
	ctx := testCtx(t)
	asleep := func() bool {
		var waiting bool
		err := e.store.Pool().QueryRow(ctx, `SELECT waiting FROM outbox_relay_wakeup
			WHERE channel = 'watermill_outbox' AND consumer_group = 'relay'`).Scan(&waiting)
		return err == nil && waiting
	}
	listener := func() (pid int32) {
		_ = e.store.Pool().QueryRow(ctx, `SELECT pid FROM pg_stat_activity
			WHERE datname = current_database() AND query LIKE 'LISTEN %'`).Scan(&pid)
		return pid
	}
	id := e.newWidget(t)
	const n = 10
	var total, worst time.Duration
	for i := range n {
		if i == n/2 {
			// Drop the listener's connection: the relay must listen again.
			old := listener()
			var killed bool
			if err := e.store.Pool().QueryRow(ctx, `SELECT pg_terminate_backend($1)`, old).Scan(&killed); err != nil || !killed {
				t.Fatalf("terminate the listener %d: %v %v", old, killed, err)
			}
			if !eventually(t, deliveryWait, func() bool { pid := listener(); return pid != 0 && pid != old }) {
				t.Fatal("the relay did not LISTEN again after its connection dropped")
			}
		}
		if !eventually(t, deliveryWait, asleep) {
			t.Fatal("the idle relay never set its wake-up flag")
		}
		ev := e.commit(t, id, 1)[0]
		committed := time.Now()
		got := e.collect(t, 1)[0]
		if got.d.MessageId != ev.ID {
			t.Fatalf("event %d: got %s, want %s", i, got.d.MessageId, ev.ID)
		}
		lat := max(got.at.Sub(committed), 0)
		total += lat
		worst = max(worst, lat)
		if lat > 5*time.Second {
			t.Errorf("event %d took %v: the relay was not woken by NOTIFY", i, lat)
		}
	}
	t.Logf("asleep relay, commit→delivery over %d events: mean %v, max %v", n, total/n, worst)
}
