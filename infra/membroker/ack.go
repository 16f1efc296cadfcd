package membroker

import (
	"slices"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Ack acknowledges the delivery tag, with multiple every earlier one too
// (tag 0 with multiple: all). An unknown tag closes the channel with 406.
func (ch *channel) Ack(tag uint64, multiple bool) error {
	return ch.async(func(*effects) error {
		settled, err := ch.settleLocked(tag, multiple)
		if err != nil {
			return err
		}
		ch.b.afterSettleLocked(ch, settled)
		return nil
	})
}

// Nack rejects the delivery tag (and with multiple the earlier ones):
// requeued to its place and redelivered, or dead-lettered (dropped without
// a dead-letter exchange).
func (ch *channel) Nack(tag uint64, multiple, requeue bool) error {
	return ch.async(func(*effects) error {
		settled, err := ch.settleLocked(tag, multiple)
		if err != nil {
			return err
		}
		b := ch.b
		if requeue {
			b.requeueLocked(settled)
		} else {
			for _, p := range settled {
				if !p.q.deleted {
					b.deadLetterLocked(p.q, p.msg, "rejected")
				}
			}
		}
		b.afterSettleLocked(ch, settled)
		return nil
	})
}

// Reject is Nack of one tag; it makes the channel an amqp091.Acknowledger.
func (ch *channel) Reject(tag uint64, requeue bool) error { return ch.Nack(tag, false, requeue) }

// settleLocked takes the pending deliveries an ack or nack names off the
// channel, in tag order.
func (ch *channel) settleLocked(tag uint64, multiple bool) ([]*pending, error) {
	var out []*pending
	switch {
	case multiple && tag == 0:
		out = ch.pendingUpToLocked(ch.lastTag)
	case ch.pending[tag] == nil:
		return nil, exception(amqp091.PreconditionFailed, "unknown delivery tag %d", tag)
	case multiple:
		out = ch.pendingUpToLocked(tag)
	default:
		out = []*pending{ch.pending[tag]}
	}
	for _, p := range out {
		ch.forgetLocked(p)
	}
	return out, nil
}

// settleAllLocked takes every pending delivery off the channel.
func (ch *channel) settleAllLocked() []*pending {
	out := ch.pendingUpToLocked(ch.lastTag)
	for _, p := range out {
		ch.forgetLocked(p)
	}
	return out
}

// pendingUpToLocked lists the pending deliveries with a tag up to tag, in
// order: by walking the tags when the span is short, else by sorting the
// pending set (one old unacked tag must not make every ack walk millions).
func (ch *channel) pendingUpToLocked(tag uint64) []*pending {
	var out []*pending
	if tag < ch.lowTag {
		return nil
	}
	if span := tag - ch.lowTag + 1; span <= uint64(2*len(ch.pending)+16) {
		for t := ch.lowTag; t <= tag; t++ {
			if p, ok := ch.pending[t]; ok {
				out = append(out, p)
			}
		}
		return out
	}
	for t, p := range ch.pending {
		if t <= tag {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b *pending) int { return cmpSeq(a.tag, b.tag) })
	return out
}

func (ch *channel) forgetLocked(p *pending) {
	delete(ch.pending, p.tag)
	p.c.unacked--
	ch.unackedCount--
	if len(ch.pending) == 0 {
		ch.lowTag = ch.lastTag + 1
		return
	}
	for ch.lowTag <= ch.lastTag && ch.pending[ch.lowTag] == nil {
		ch.lowTag++
	}
}

// afterSettleLocked hands out what the freed prefetch allows: on the queues
// of the settled deliveries, and with a channel-wide limit on every queue
// the channel consumes from.
func (b *Broker) afterSettleLocked(ch *channel, settled []*pending) {
	for _, p := range settled {
		if !p.q.deleted {
			b.dispatchLocked(p.q)
		}
	}
	if ch.globalLimit > 0 {
		for _, c := range ch.consumers {
			b.dispatchLocked(c.q)
		}
	}
}

// requeueLocked puts settled deliveries back into their queues (unless
// deleted meanwhile) to be redelivered.
func (b *Broker) requeueLocked(settled []*pending) {
	byQueue := map[*queue][]*message{}
	var order []*queue
	for _, p := range settled {
		if p.q.deleted {
			continue
		}
		if _, seen := byQueue[p.q]; !seen {
			order = append(order, p.q)
		}
		p.msg.redelivered = true
		byQueue[p.q] = append(byQueue[p.q], p.msg)
	}
	for _, q := range order {
		q.requeue(byQueue[q])
		b.dispatchLocked(q)
	}
}
