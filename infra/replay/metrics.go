package replay

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	events   *prometheus.CounterVec
	replays  *prometheus.CounterVec
	duration prometheus.Histogram
	running  prometheus.Gauge
}

// newMetrics builds the responder's metrics and registers them with reg
// when it is set. A collector already registered (a second responder on the
// same registry) is shared rather than refused.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "statemill", Name: "replay_events_published_total",
			Help: "Events published by replays (every attempt's, including retried ones).",
		}, []string{"entity_type"}),
		replays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "statemill", Name: "replays_total",
			Help: "Replays finished, by outcome (done or failed).",
		}, []string{"status"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "statemill", Name: "replay_duration_seconds",
			Help:    "Duration of successful replays, from snapshot to the confirmed completion marker.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 9), // 10ms .. ~11min
		}),
		running: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "statemill", Name: "replays_running",
			Help: "Replays being published right now.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	var err error
	if m.events, err = register(reg, m.events); err != nil {
		return nil, err
	}
	if m.replays, err = register(reg, m.replays); err != nil {
		return nil, err
	}
	if m.duration, err = register(reg, m.duration); err != nil {
		return nil, err
	}
	if m.running, err = register(reg, m.running); err != nil {
		return nil, err
	}
	return m, nil
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	if err != nil {
		var zero C
		return zero, fmt.Errorf("replay: register metrics: %w", err)
	}
	return c, nil
}
