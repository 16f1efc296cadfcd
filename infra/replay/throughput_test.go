package replay_test

import (
	"context"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
)

// liveHeap samples the heap that survived the last GC until stop is called
// and returns its peak: with rows streamed it stays flat however long the
// history is; a replay that buffered its rows would hold all of them.
func liveHeap() (stop func() uint64) {
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	var (
		mu   sync.Mutex
		peak uint64
	)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			mu.Lock()
			peak = max(peak, sample[0].Value.Uint64())
			mu.Unlock()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-finished
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}

// A large replay streams: its rate is logged (no timing assertion: -race
// and shared machines vary), and the live heap stays far below what the
// replayed events weigh.
func TestReplayThroughputAndBoundedMemory(t *testing.T) {
	// Not parallel: the heap measurement needs the process to itself.
	const n = 20000
	e := newEnv(t)
	e.bulk(t, n)
	var bytes int64
	if err := e.pool.QueryRow(testCtx(t), `SELECT sum(octet_length(attributes::text) + 300) FROM history`).Scan(&bytes); err != nil {
		t.Fatal(err)
	}
	obs := e.observeWith(t, false, envelope.ReplayBinding("bench", "widget"))
	r := e.start(t, func(c *replay.Config) { c.Workers = 1 })

	base := liveHeap()()
	stop := liveHeap()
	began := time.Now()
	id := submit(t, r, replay.Request{Prefix: "bench", EntityType: "widget"})
	rec := waitStatus(t, r, id, replay.StatusDone)
	took := time.Since(began)
	peak := stop()
	eventually(t, waitLong, "every replayed message", func() bool { return obs.n() == n+2 })
	if rec.Count != n {
		t.Fatalf("count %d, want %d", rec.Count, n)
	}
	responderTook := rec.FinishedAt.Sub(*rec.StartedAt)
	t.Logf("replayed %d events (~%d MiB on the wire) in %s: %.0f events/s (request to done: %s, %.0f events/s); live heap %d MiB at rest, peak %d MiB",
		n, bytes>>20, responderTook.Round(time.Millisecond), float64(n)/responderTook.Seconds(),
		took.Round(time.Millisecond), float64(n)/took.Seconds(), base>>20, peak>>20)
	// The events weigh ~bytes on the wire and two to three times that as Go
	// values; a replay that held them would grow the live heap by more than
	// bytes. What a streaming replay keeps live at a GC (the confirm window,
	// driver and socket buffers) reached 5 MiB under -race on a busy
	// machine, so the bound is bytes, not a fraction of it.
	if growth := int64(peak) - int64(base); growth > bytes {
		t.Fatalf("live heap grew by %d MiB during a replay of %d MiB: rows are not streamed", growth>>20, bytes>>20)
	}
}

// BenchmarkReplay measures a full replay of 50k events end to end
// (snapshot, streaming, pipelined confirms, both markers).
func BenchmarkReplay(b *testing.B) {
	const n = 50000
	e := newEnv(b)
	e.bulk(b, n)
	// A bound queue, or the events would pile up in the unroutable queue.
	e.observeWith(b, false, envelope.ReplayBinding("bench", "widget"))
	r := e.start(b, func(c *replay.Config) { c.Workers = 1 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.ResetTimer()
	var events int64
	for b.Loop() {
		got, err := r.Submit(ctx, replay.Request{Prefix: "bench", EntityType: "widget"})
		if err != nil {
			b.Fatal(err)
		}
		rec := waitStatus(b, r, got.ReplayID, replay.StatusDone)
		events += rec.Count
	}
	b.ReportMetric(float64(events)/b.Elapsed().Seconds(), "events/s")
}
