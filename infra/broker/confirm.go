package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// DefaultConfirmWindow is how many publishes a ConfirmPublisher keeps
// unconfirmed by default: enough to hide the confirm round trip on loopback
// and LAN links, small enough that a failure re-sends little.
const DefaultConfirmWindow = 256

// ErrNacked means the broker refused a message it was sent (a nack): it was
// not stored, and the messages after it may not have been either.
var ErrNacked = errors.New("broker: message nacked")

// ErrChannelClosed means the channel closed before every confirm arrived:
// the unconfirmed messages may or may not have been stored.
var ErrChannelClosed = errors.New("broker: channel closed before the confirms arrived")

// SetMessageProperties sets the AMQP properties every statemill message
// carries (DESIGN §5): message_id, content_type application/json, persistent
// delivery, the correlation id property and a timestamp, plus the header
// Watermill's AMQP marshaler reads the message id from, so a message sent
// without Watermill decodes the same as one sent with it.
func SetMessageProperties(p *amqp091.Publishing, messageID, correlationID string) {
	p.MessageId = messageID
	p.ContentType = "application/json"
	p.DeliveryMode = amqp091.Persistent
	p.CorrelationId = correlationID
	p.Timestamp = time.Now().UTC()
	if p.Headers == nil {
		p.Headers = amqp091.Table{}
	}
	p.Headers[amqp.DefaultMessageUUIDHeaderKey] = messageID
}

// ConfirmPublisher publishes on its own channel in confirm mode with the
// confirms pipelined: Publish returns once the message is sent and blocks
// only while Window confirms are outstanding. Watermill's AMQP publisher
// waits for each confirm before the next publish (about 2.5k msg/s in
// baselines H8/H12); a replay needs well over 10k/s (DESIGN §10).
//
// A nack or a closed channel is sticky: every later call returns the error,
// because the caller can no longer know which messages arrived and must
// start over (on a new ConfirmPublisher). It is safe for concurrent use;
// publishes are serialised on the channel.
type ConfirmPublisher struct {
	ch     Channel
	window int
	closes chan *amqp091.Error

	mu      sync.Mutex
	sent    uint64    // publishes so far: the sequence number of the last one
	pending []pending // oldest first
	err     error
}

// pending is a publish awaiting its confirm; seq is its publish sequence
// number on the channel (the delivery tag of the confirm), for errors.
type pending struct {
	confirm Confirmation
	seq     uint64
}

// NewConfirmPublisher opens a channel on conn and puts it in confirm mode.
// window bounds the unconfirmed publishes; 0 means DefaultConfirmWindow.
func NewConfirmPublisher(conn Conn, window int) (*ConfirmPublisher, error) {
	if conn == nil {
		return nil, errors.New("broker: confirm publisher needs a connection")
	}
	if window < 0 {
		return nil, fmt.Errorf("broker: confirm window %d is negative", window)
	}
	if window == 0 {
		window = DefaultConfirmWindow
	}
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("broker: open channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		_ = ch.Close()
		return nil, fmt.Errorf("broker: confirm mode: %w", err)
	}
	p := &ConfirmPublisher{ch: ch, window: window, closes: ch.NotifyClose(make(chan *amqp091.Error, 1))}
	return p, nil
}

// Publish sends msg to exchange with routingKey. It returns once the
// message is sent, after waiting for the oldest confirm while Window are
// outstanding; ctx bounds that wait.
func (p *ConfirmPublisher) Publish(ctx context.Context, exchange, routingKey string, msg amqp091.Publishing) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return p.err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := p.reap(); err != nil {
		return err
	}
	for len(p.pending) >= p.window {
		if err := p.waitOldest(ctx); err != nil {
			return err
		}
	}
	c, err := p.ch.Publish(ctx, exchange, routingKey, false, msg)
	if err != nil {
		if p.ch.IsClosed() {
			return p.fail(fmt.Errorf("%w: %w", ErrChannelClosed, p.closeReason(err)))
		}
		// Refused before it was sent (an invalid header table): nothing is
		// lost, the publisher stays usable.
		return fmt.Errorf("broker: publish to %s %q: %w", exchange, routingKey, err)
	}
	p.sent++
	p.pending = append(p.pending, pending{confirm: c, seq: p.sent})
	return nil
}

// Wait returns once every message published so far is confirmed, or with
// the first nack, a closed channel, or ctx's error.
func (p *ConfirmPublisher) Wait(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitFor(ctx, p.sent)
}

// Sent is the sequence number of the last publish: 1 for the first, 0
// before any.
func (p *ConfirmPublisher) Sent() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent
}

// WaitFor returns once every publish up to sequence number seq (see Sent)
// is confirmed, or with the first nack, a closed channel, or ctx's error.
// Later publishes may still be outstanding.
func (p *ConfirmPublisher) WaitFor(ctx context.Context, seq uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitFor(ctx, seq)
}

func (p *ConfirmPublisher) waitFor(ctx context.Context, seq uint64) error {
	if p.err != nil {
		return p.err
	}
	for len(p.pending) > 0 && p.pending[0].seq <= seq {
		if err := p.waitOldest(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Confirmed reports, without waiting, the sequence number up to which every
// publish is confirmed, or the first nack or a closed channel.
func (p *ConfirmPublisher) Confirmed() (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return 0, p.err
	}
	if err := p.reap(); err != nil {
		return 0, err
	}
	if len(p.pending) > 0 {
		return p.pending[0].seq - 1, nil
	}
	return p.sent, nil
}

// Outstanding is the number of messages sent but not yet confirmed (as far
// as this publisher has looked).
func (p *ConfirmPublisher) Outstanding() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending)
}

// Close closes the channel. Unconfirmed messages may or may not arrive;
// call Wait first to know.
func (p *ConfirmPublisher) Close() error {
	err := p.ch.Close()
	if errors.Is(err, amqp091.ErrClosed) {
		return nil
	}
	return err
}

// reap drops confirms that already arrived, without blocking, so the queue
// stays short and a nack surfaces at the next publish.
func (p *ConfirmPublisher) reap() error {
	for len(p.pending) > 0 {
		select {
		case <-p.pending[0].confirm.Done():
			if err := p.settle(); err != nil {
				return err
			}
		default:
			return nil
		}
	}
	return nil
}

// waitOldest blocks until the oldest outstanding confirm arrives.
func (p *ConfirmPublisher) waitOldest(ctx context.Context) error {
	select {
	case <-p.pending[0].confirm.Done():
		return p.settle()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// settle pops the oldest confirm, which has arrived.
func (p *ConfirmPublisher) settle() error {
	oldest := p.pending[0]
	p.pending[0] = pending{}
	p.pending = p.pending[1:]
	if oldest.confirm.Acked() {
		return nil
	}
	// amqp091 nacks every outstanding confirm when the channel closes;
	// tell that apart from a real nack.
	if p.ch.IsClosed() {
		return p.fail(fmt.Errorf("%w: %w", ErrChannelClosed, p.closeReason(amqp091.ErrClosed)))
	}
	return p.fail(fmt.Errorf("%w (delivery tag %d)", ErrNacked, oldest.seq))
}

func (p *ConfirmPublisher) fail(err error) error {
	p.err = err
	p.pending = nil
	return err
}

// closeReason is the broker's reason for closing the channel when it gave
// one (a channel exception such as a missing exchange), else fallback.
func (p *ConfirmPublisher) closeReason(fallback error) error {
	select {
	case e, ok := <-p.closes:
		if ok && e != nil {
			return e
		}
	default:
	}
	return fallback
}
