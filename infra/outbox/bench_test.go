package outbox_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/outbox"
	"github.com/statemill/statemill/infra/pgstore"
)

// BenchmarkRelayDrain fills the outbox with drainRows committed events,
// then starts a relay and measures how fast the events reach a consumer
// (a durable queue, so confirms wait for the broker's disk). Baselines goal
// 2 asks for a drain of at least 1.2x the sustained command rate, so the
// "commands" case measures that rate in the same run: 4 writers, one
// transition per transaction (lock, row update, history and outbox rows).
//
//	go test -run '^$' -bench RelayDrain -benchtime 1x ./infra/outbox
func BenchmarkRelayDrain(b *testing.B) {
	const drainRows = 20000
	b.Run("commands", func(b *testing.B) {
		e := newEnv(b, true)
		rate := commandRate(b, e, 4000)
		b.ReportMetric(rate, "commands/s")
	})
	for _, k := range relayKinds {
		b.Run(k.name, func(b *testing.B) {
			e := newEnv(b, true)
			var total int
			var elapsed time.Duration
			for range b.N {
				b.StopTimer()
				want := e.fill(b, drainRows, 4, 10)
				r := k.build(b, e.target(), relayOptions{})
				b.StartTimer()
				began := time.Now()
				stop, _ := startRelay(b, r)
				seen := e.collectAll(b, want, 5*time.Minute)
				took := time.Since(began)
				b.StopTimer()
				flush(b, r)
				stop()
				dups := 0
				for _, n := range seen {
					dups += n - 1
				}
				total += drainRows
				elapsed += took
				rate := float64(drainRows) / took.Seconds()
				if p, ok := r.(*outbox.PipelinedRelay); ok {
					s := p.Stats()
					b.Logf("%s: %d events in %v = %.0f events/s, %d duplicates; %d batches, longest %v, longest xid hold %v",
						k.name, drainRows, took.Round(time.Millisecond), rate, dups, s.Batches,
						s.MaxBatch.Round(time.Millisecond), s.MaxXIDHold.Round(100*time.Microsecond))
				} else {
					b.Logf("%s: %d events in %v = %.0f events/s, %d duplicates", k.name, drainRows, took.Round(time.Millisecond), rate, dups)
				}
			}
			b.ReportMetric(float64(total)/elapsed.Seconds(), "events/s")
		})
	}
}

// commandRate commits n command-shaped transactions from 4 writers and
// returns the rate.
func commandRate(b *testing.B, e *env, n int) float64 {
	b.Helper()
	began := time.Now()
	e.fill(b, n, 4, 1)
	rate := float64(n) / time.Since(began).Seconds()
	b.Logf("%d command-shaped transactions from 4 writers: %.0f commands/s", n, rate)
	return rate
}

// BenchmarkRelayLatencyAtHalfLoad measures commit→consumer latency while
// 4 writers commit at half the command rate measured just before (goal 3:
// p99 ≤ 100ms). A relay that drains slower than that falls behind, and its
// latency grows with the run.
//
//	go test -run '^$' -bench RelayLatencyAtHalfLoad -benchtime 1x ./infra/outbox
func BenchmarkRelayLatencyAtHalfLoad(b *testing.B) {
	const writers, runFor = 4, 5 * time.Second
	for _, k := range relayKinds {
		b.Run(k.name, func(b *testing.B) {
			e := newEnv(b, true)
			half := commandRate(b, e, 2000) / 2
			for range b.N {
				r := k.build(b, e.target(), relayOptions{})
				runRelay(b, r)
				flush(b, r) // the rate measurement's rows go out before the load starts
				e.drain()

				var mu sync.Mutex
				committed := map[string]time.Time{}
				ctx, cancel := context.WithTimeout(testCtx(b), runFor)
				var wg sync.WaitGroup
				every := time.Duration(float64(writers) / half * float64(time.Second))
				for range writers {
					id := e.newWidget(b)
					wg.Go(func() {
						tick := time.NewTicker(every)
						defer tick.Stop()
						for {
							select {
							case <-ctx.Done():
								return
							case <-tick.C:
							}
							var events []*envelope.Event
							err := e.store.InTx(context.WithoutCancel(ctx), func(ctx context.Context, tx *pgstore.Tx) error {
								var err error
								events, err = fire(ctx, tx, id, 1)
								return err
							})
							at := time.Now()
							if err != nil {
								b.Errorf("command: %v", err)
								return
							}
							mu.Lock()
							committed[events[0].ID] = at
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				cancel()
				want := map[string]bool{}
				for id := range committed {
					want[id] = true
				}
				arrived := e.arrivals(b, want, 2*time.Minute)
				var lat []time.Duration
				for id, at := range arrived {
					lat = append(lat, max(at.Sub(committed[id]), 0))
				}
				slices.Sort(lat)
				q := func(p float64) time.Duration { return lat[int(p*float64(len(lat)-1))] }
				b.Logf("%s at %.0f commands/s for %v (%d events): commit→consumer p50 %v, p99 %v, max %v",
					k.name, half, runFor, len(lat), q(0.5).Round(100*time.Microsecond), q(0.99).Round(100*time.Microsecond), q(1).Round(time.Millisecond))
				b.ReportMetric(float64(q(0.5).Microseconds())/1000, "p50-ms")
				b.ReportMetric(float64(q(0.99).Microseconds())/1000, "p99-ms")
			}
		})
	}
}

// drain empties the delivery buffer (arrivals ignores stragglers).
func (e *env) drain() {
	for {
		select {
		case <-e.deliveries:
		default:
			return
		}
	}
}

// arrivals waits until every id in want arrived and returns when each
// first did.
func (e *env) arrivals(t testing.TB, want map[string]bool, timeout time.Duration) map[string]time.Time {
	t.Helper()
	first := make(map[string]time.Time, len(want))
	deadline := time.After(timeout)
	for len(first) < len(want) {
		select {
		case r := <-e.deliveries:
			if _, ok := first[r.d.MessageId]; !ok && want[r.d.MessageId] {
				first[r.d.MessageId] = r.at
			}
		case <-deadline:
			t.Fatalf("after %v, %d of %d events never arrived", timeout, len(want)-len(first), len(want))
		}
	}
	return first
}
