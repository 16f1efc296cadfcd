package projection

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// collectors are the runtime's metrics, shared by every worker registered
// with the same Registerer and labelled by projection name.
type collectors struct {
	applied      *prometheus.CounterVec   // {projection, queue}
	deadLettered *prometheus.CounterVec   // {projection}
	retries      *prometheus.CounterVec   // {projection}
	reconnects   *prometheus.CounterVec   // {projection}
	rebuilds     *prometheus.CounterVec   // {projection, kind, outcome}
	batch        *prometheus.HistogramVec // {projection, queue}
	lagMessages  *prometheus.GaugeVec     // {projection}
	lagSeconds   *prometheus.GaugeVec     // {projection}
}

// metrics is the worker's view of the collectors, with its name bound.
type metrics struct {
	appliedLive, appliedReplay prometheus.Counter
	deadLettered               prometheus.Counter
	retries                    prometheus.Counter
	reconnects                 prometheus.Counter
	batchLive, batchReplay     prometheus.Observer
	lagMessages, lagSeconds    prometheus.Gauge
	rebuilds                   *prometheus.CounterVec
	name                       string
}

func newMetrics(reg prometheus.Registerer, name string) (*metrics, error) {
	const ns, sub = "statemill", "projection"
	c := collectors{
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "events_applied_total", Help: "Events handed to the projection and committed, by queue (live or replay)."},
			[]string{"projection", "queue"}),
		deadLettered: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "dead_lettered_total", Help: "Messages sent to the dead-letter queue: undecodable, or refused by the projection."},
			[]string{"projection"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "transient_retries_total", Help: "Batch transactions retried after a transient failure (database unreachable)."},
			[]string{"projection"}),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "broker_reconnects_total", Help: "Broker connections re-established after a loss."},
			[]string{"projection"}),
		rebuilds: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "replays_total", Help: "Rebuilds and catch-ups finished, by kind and outcome (completed or failed)."},
			[]string{"projection", "kind", "outcome"}),
		batch: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub,
			Name: "batch_duration_seconds", Help: "Time to apply and acknowledge one batch, retries included.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}},
			[]string{"projection", "queue"}),
		lagMessages: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
			Name: "lag_messages", Help: "Messages ready in N.live (-1 while the broker is unreachable)."},
			[]string{"projection"}),
		lagSeconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
			Name: "lag_seconds", Help: "Age of the oldest live event received but not yet applied; 0 when none."},
			[]string{"projection"}),
	}
	var err error
	if c.applied, err = register(reg, c.applied); err != nil {
		return nil, err
	}
	if c.deadLettered, err = register(reg, c.deadLettered); err != nil {
		return nil, err
	}
	if c.retries, err = register(reg, c.retries); err != nil {
		return nil, err
	}
	if c.reconnects, err = register(reg, c.reconnects); err != nil {
		return nil, err
	}
	if c.rebuilds, err = register(reg, c.rebuilds); err != nil {
		return nil, err
	}
	if c.batch, err = register(reg, c.batch); err != nil {
		return nil, err
	}
	if c.lagMessages, err = register(reg, c.lagMessages); err != nil {
		return nil, err
	}
	if c.lagSeconds, err = register(reg, c.lagSeconds); err != nil {
		return nil, err
	}
	return &metrics{
		appliedLive:   c.applied.WithLabelValues(name, "live"),
		appliedReplay: c.applied.WithLabelValues(name, "replay"),
		deadLettered:  c.deadLettered.WithLabelValues(name),
		retries:       c.retries.WithLabelValues(name),
		reconnects:    c.reconnects.WithLabelValues(name),
		batchLive:     c.batch.WithLabelValues(name, "live"),
		batchReplay:   c.batch.WithLabelValues(name, "replay"),
		lagMessages:   c.lagMessages.WithLabelValues(name),
		lagSeconds:    c.lagSeconds.WithLabelValues(name),
		rebuilds:      c.rebuilds,
		name:          name,
	}, nil
}

func (m *metrics) replayFinished(kind runKind, outcome string) {
	m.rebuilds.WithLabelValues(m.name, string(kind), outcome).Inc()
}

// register registers c, or returns the collector already registered under
// the same description (several workers, or a restart, in one process).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, err
}
