package projection_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/projection"
)

// BenchmarkRebuildRate measures how fast a rebuild applies a replay that
// is already queued: the rate of batched read-model transactions (the
// reason the runtime consumes with amqp091-go rather than Watermill's
// one-message-at-a-time subscriber; baselines §7.5 asks for ≥10k events/s).
func BenchmarkRebuildRate(b *testing.B) {
	e := newEnv(b)
	proj := newWidgets()
	w := e.startWorker(b, "", withProjection(proj))
	const perWidget = 10
	var history []envelope.Event
	for i := range 2000 {
		history = append(history, widgetHistory(fmt.Sprintf("w%04d", i), perWidget)...)
	}
	var total time.Duration
	runs := 0
	for b.Loop() {
		b.StopTimer()
		gate := make(chan struct{})
		proj.setHook(func(int64, []envelope.Event) error { <-gate; return nil })
		before := w.status(b).ActiveGeneration
		if _, err := w.Rebuild(testCtx(b)); err != nil {
			b.Fatal(err)
		}
		req := e.nextRequest(b)
		e.serveReplay(b, req, history, cursor(runs+1))
		b.StartTimer()
		start := time.Now()
		close(gate)
		for {
			st := w.status(b)
			if st.Rebuild.State == projection.RebuildCompleted && st.ActiveGeneration == before+1 {
				break
			}
			if time.Since(start) > 5*time.Minute {
				b.Fatalf("no swap: %+v", st.Rebuild)
			}
			time.Sleep(50 * time.Millisecond)
		}
		total += time.Since(start)
		runs++
		proj.setHook(nil)
	}
	b.ReportMetric(float64(len(history)*runs)/total.Seconds(), "events/s")
	mfs, _ := w.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "statemill_projection_batch_duration_seconds" {
			for _, m := range mf.GetMetric() {
				if h := m.GetHistogram(); h.GetSampleCount() > 0 {
					b.ReportMetric(1000*h.GetSampleSum()/float64(h.GetSampleCount()), "ms/batch")
				}
			}
		}
	}
}
