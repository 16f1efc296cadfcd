package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/broker"
)

// DeadQueue is where requests that can never run go: QueueName+".dead".
func (r *Responder) DeadQueue() string { return r.cfg.QueueName + ".dead" }

// consumeLoop consumes the request queue until ctx is done, reconnecting
// with backoff after the broker goes away.
func (r *Responder) consumeLoop(ctx context.Context) {
	failures := 0
	for {
		began := time.Now()
		err := r.consume(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			failures = 0 // it ran for a while: start the backoff afresh
		}
		failures++
		wait := backoff(failures, 200*time.Millisecond, 5*time.Second)
		r.log.Warn("replay: request consumer stopped; reconnecting", "err", err, "in", wait)
		if !sleep(ctx, wait) {
			return
		}
	}
}

// declare declares the request queue (durable, dead-lettering to
// DeadQueue) and its binding, on a channel of conn. The commands exchange
// belongs to the shared topology and must exist. When the queue already
// exists with other arguments (a definitions file that left out the
// dead-letter ones) it is used as it is: requests that can never run are
// then dropped, with a log line, rather than dead-lettered. With
// Topology.Passive the definitions file has declared both queues and the
// binding (the producer's user has no configure permission): declare only
// checks that the exchange and the queues exist, and a missing one is a
// *broker.MissingError.
func (r *Responder) declare(conn broker.Conn) (broker.Channel, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open channel: %w", err)
	}
	if r.cfg.Topology.Passive {
		if err := broker.CheckExchange(ch, r.cfg.Topology.CommandsExchange); err != nil {
			return nil, err
		}
		for _, q := range []string{r.DeadQueue(), r.cfg.QueueName} {
			if _, err := broker.CheckQueue(ch, q); err != nil {
				return nil, err
			}
		}
		return ch, nil
	}
	if _, err := ch.QueueDeclare(r.DeadQueue(), true, false, false, false, nil); err != nil {
		return nil, fmt.Errorf("declare %s: %w", r.DeadQueue(), err)
	}
	_, err = ch.QueueDeclare(r.cfg.QueueName, true, false, false, false, amqp091.Table{
		"x-dead-letter-exchange":    "",
		"x-dead-letter-routing-key": r.DeadQueue(),
	})
	var amqpErr *amqp091.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == amqp091.PreconditionFailed {
		r.log.Warn("replay: the request queue exists with other arguments; using it as it is", "err", err)
		if ch, err = conn.Channel(); err != nil { // the failed declare closed the channel
			return nil, fmt.Errorf("open channel: %w", err)
		}
		_, err = ch.QueueDeclarePassive(r.cfg.QueueName, true, false, false, false, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("declare %s: %w", r.cfg.QueueName, err)
	}
	if err := ch.QueueBind(r.cfg.QueueName, RequestRoutingKey, r.cfg.Topology.CommandsExchange, false, nil); err != nil {
		return nil, fmt.Errorf("bind %s to %s: %w", r.cfg.QueueName, r.cfg.Topology.CommandsExchange, err)
	}
	return ch, nil
}

// consume runs one connection's worth of consuming.
func (r *Responder) consume(ctx context.Context) error {
	conn, err := r.cfg.Dial("replay-requests")
	if err != nil {
		return fmt.Errorf("replay: connect to the broker: %w", err)
	}
	// Closing the connection requeues a delivery not yet acked.
	defer conn.Close()
	ch, err := r.declare(conn)
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	// Recording a request is one insert: a small prefetch keeps the
	// round trips hidden without hoarding requests from other instances.
	if err := ch.Qos(16, 0, false); err != nil {
		return fmt.Errorf("replay: qos: %w", err)
	}
	deliveries, err := ch.Consume(r.cfg.QueueName, "", false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("replay: consume %s: %w", r.cfg.QueueName, err)
	}
	closed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	r.readyOnce.Do(func() { close(r.ready) })
	r.log.Info("replay: consuming requests", "exchange", r.cfg.Topology.CommandsExchange)
	for {
		select {
		case <-ctx.Done():
			return nil
		case e := <-closed:
			if e == nil {
				return errors.New("replay: channel closed")
			}
			return e
		case d, ok := <-deliveries:
			if !ok {
				return errors.New("replay: deliveries ended")
			}
			if err := r.handle(ctx, d); err != nil {
				return err
			}
		}
	}
}

// handle records one request and acks it; the replay runs in the pool, never
// here (RabbitMQ's consumer_timeout would close the channel under a long
// replay, and the request would run again). A request that can never run is
// dead-lettered, so it cannot loop. A request that fails to record for a
// transient reason (database down) is retried here with backoff: nothing
// else can be recorded meanwhile anyway.
func (r *Responder) handle(ctx context.Context, d amqp091.Delivery) error {
	var req Request
	if err := json.Unmarshal(d.Body, &req); err != nil {
		r.log.Warn("replay: undecodable request dead-lettered", "message_id", d.MessageId, "err", err, "dead_queue", r.DeadQueue())
		return nack(d)
	}
	for attempt := 1; ; attempt++ {
		rec, err := r.Submit(ctx, req)
		switch code := apperr.CodeOf(err); {
		case err == nil:
			if err := d.Ack(false); err != nil {
				return fmt.Errorf("replay: ack %s: %w", rec.ReplayID, err)
			}
			return nil
		case code == apperr.Invalid || code == apperr.Conflict || code == apperr.Malformed:
			r.log.Warn("replay: invalid request dead-lettered", "message_id", d.MessageId, "replay_id", req.ReplayID,
				"err", err, "fields", apperr.As(err).Fields, "dead_queue", r.DeadQueue())
			return nack(d)
		case ctx.Err() != nil:
			return nil // unacked: the broker redelivers it to the next consumer
		default:
			wait := backoff(attempt, 200*time.Millisecond, 5*time.Second)
			r.log.Warn("replay: recording a request failed; retrying", "replay_id", req.ReplayID, "err", err, "in", wait)
			if !sleep(ctx, wait) {
				return nil
			}
		}
	}
}

func nack(d amqp091.Delivery) error {
	if err := d.Nack(false, false); err != nil {
		return fmt.Errorf("replay: dead-letter: %w", err)
	}
	return nil
}
