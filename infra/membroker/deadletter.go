package membroker

import (
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// deadLetterLocked republishes m, rejected from q, to q's dead-letter
// exchange, with the headers RabbitMQ 3.10 adds: x-death (one entry per
// queue and reason, newest first, its count bumped when the message dies
// there again) and the x-first-death-* trio. Without a dead-letter exchange,
// or with a missing one, the message is dropped.
func (b *Broker) deadLetterLocked(q *queue, m *message, reason string) {
	if !q.hasDLX {
		return
	}
	x, ok := b.lookupExchangeLocked(q.dlx)
	if !ok {
		b.log.Warn("membroker: dead-letter exchange missing; message dropped", "queue", q.name, "dead_letter_exchange", q.dlx)
		return
	}
	p := *m.pub
	p.Headers = copyTable(m.pub.Headers)
	if p.Headers == nil {
		p.Headers = amqp091.Table{}
	}
	entry := amqp091.Table{
		"count":        int64(1),
		"reason":       reason,
		"queue":        q.name,
		"time":         wireTime(time.Now()),
		"exchange":     m.exchange,
		"routing-keys": []any{m.key},
	}
	if p.Expiration != "" {
		// RabbitMQ moves the per-message TTL aside so the copy does not expire.
		entry["original-expiration"] = p.Expiration
		p.Expiration = ""
	}
	p.Headers["x-death"] = addDeath(p.Headers["x-death"], entry)
	for k, v := range map[string]any{"x-first-death-reason": reason, "x-first-death-queue": q.name, "x-first-death-exchange": m.exchange} {
		if _, ok := p.Headers[k]; !ok {
			p.Headers[k] = v
		}
	}
	key := m.key
	if q.hasDLRK {
		key = q.dlrk
	}
	for _, target := range b.routeLocked(x, key) {
		target.enqueue(&p, q.dlx, key)
		b.dispatchLocked(target)
	}
}

// addDeath puts entry first in the x-death list; an existing entry for the
// same queue and reason is counted up and moved first instead.
func addDeath(prev any, entry amqp091.Table) []any {
	deaths, _ := prev.([]any)
	for i, d := range deaths {
		t, ok := d.(amqp091.Table)
		if !ok || t["queue"] != entry["queue"] || t["reason"] != entry["reason"] {
			continue
		}
		n, _ := toInt64(t["count"])
		t["count"] = n + 1
		out := append([]any{t}, deaths[:i]...)
		return append(out, deaths[i+1:]...)
	}
	return append([]any{entry}, deaths...)
}
