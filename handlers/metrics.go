package handlers

import "github.com/prometheus/client_golang/prometheus"

// transitionsTotal counts fired Product transitions (the machine's tracking hook).
var transitionsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "statemill",
	Name:      "product_transitions_total",
	Help:      "Product state-machine transitions fired (including those of rolled-back commands).",
}, []string{"event", "from", "to"})

// Collectors are the handlers' metrics, for a service to register.
func Collectors() []prometheus.Collector { return []prometheus.Collector{transitionsTotal} }
