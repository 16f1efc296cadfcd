package outbox

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/statemill/statemill/infra/broker"
)

// Row is one outbox row of an OrderedOutbox: the message to publish under
// RoutingKey, at Offset.
type Row struct {
	Offset     int64
	RoutingKey string
	Message    *message.Message
}

// OrderedOutbox is an outbox whose offsets follow commit order: a row never
// commits below one that is already visible, as in a store with a single
// writer (SQLite). A relay over it can keep a plain offset as watermark;
// PostgreSQL's outbox is not one (see PipelinedRelay).
type OrderedOutbox interface {
	// Rows returns up to limit rows after offset, in order.
	Rows(ctx context.Context, after int64, limit int) ([]Row, error)
	// Offset is the last offset group acknowledged (0 before any).
	Offset(ctx context.Context, group string) (int64, error)
	// Ack records that group published every row up to offset.
	Ack(ctx context.Context, group string, offset int64) error
	// Pending counts the rows group has not acknowledged.
	Pending(ctx context.Context, group string) (int64, error)
	// Prune deletes acknowledged rows older than retention.
	Prune(ctx context.Context, retention time.Duration) (int64, error)
	// Wakeup is closed after the next commit that adds rows. Take it before
	// reading; wait on it only when the read found nothing.
	Wakeup() <-chan struct{}
}

// SequentialConfig configures a SequentialRelay. Zero values take the defaults.
type SequentialConfig struct {
	Outbox   OrderedOutbox
	Dial     broker.Dialer // opens, and reopens, the relay's publishing connection
	Exchange string        // the topic exchange events go to

	ConsumerGroup string        // the offset's name. Default "relay".
	BatchSize     int           // rows read and published together. Default 500.
	Window        int           // unconfirmed publishes. Default broker.DefaultConfirmWindow.
	IdlePoll      time.Duration // look anyway this often (writers in other processes do not wake it). Default 1s.
	BatchDeadline time.Duration // bounds one batch from read to ack. Default 5s.
	Retention     time.Duration // published rows kept for inspection. Default 1h.
	PruneInterval time.Duration // Default 1m.
	Logger        watermill.LoggerAdapter
}

func (c *SequentialConfig) setDefaults() {
	if c.ConsumerGroup == "" {
		c.ConsumerGroup = defaultConsumerGroup
	}
	if c.BatchSize == 0 {
		c.BatchSize = 500
	}
	if c.Window == 0 {
		c.Window = broker.DefaultConfirmWindow
	}
	if c.IdlePoll == 0 {
		c.IdlePoll = time.Second
	}
	if c.BatchDeadline == 0 {
		c.BatchDeadline = 5 * time.Second
	}
	if c.Retention == 0 {
		c.Retention = defaultRetention
	}
	if c.PruneInterval == 0 {
		c.PruneInterval = defaultPruneInterval
	}
	if c.Logger == nil {
		c.Logger = watermill.NopLogger{}
	}
}

// Validate reports a config the relay cannot run with.
func (c SequentialConfig) Validate() error {
	var errs []error
	if c.Outbox == nil {
		errs = append(errs, errors.New("outbox: Outbox is required"))
	}
	if c.Dial == nil {
		errs = append(errs, errors.New("outbox: Dial is required"))
	}
	if c.Exchange == "" {
		errs = append(errs, errors.New("outbox: Exchange is required"))
	}
	if c.BatchSize < 0 || c.Window < 0 || c.IdlePoll < 0 || c.BatchDeadline < 0 || c.Retention < 0 || c.PruneInterval < 0 {
		errs = append(errs, errors.New("outbox: durations and sizes must not be negative"))
	}
	return errors.Join(errs...)
}

// SequentialRelay relays an OrderedOutbox: it reads a batch after its
// offset, publishes it with the confirms pipelined, waits for them, then
// acknowledges the batch's last offset. A failure before the ack publishes
// the batch again (at-least-once; consumers are idempotent). It wakes on
// the store's commit signal, so it neither polls busily nor lags.
type SequentialRelay struct {
	config  SequentialConfig
	wake    chan struct{}
	closed  chan struct{}
	close   sync.Once
	running chan struct{}
	once    sync.Once

	broker brokerSession
}

// NewSequentialRelay builds a relay.
func NewSequentialRelay(c SequentialConfig) (*SequentialRelay, error) {
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &SequentialRelay{
		config: c, wake: make(chan struct{}, 1), closed: make(chan struct{}), running: make(chan struct{}),
		broker: brokerSession{dial: c.Dial, window: c.Window},
	}, nil
}

// Running is closed once the relay has first read the outbox with a broker
// connection open.
func (r *SequentialRelay) Running() <-chan struct{} { return r.running }

// Close stops Run.
func (r *SequentialRelay) Close() error {
	r.close.Do(func() { close(r.closed) })
	return nil
}

// Pending counts rows not yet published.
func (r *SequentialRelay) Pending(ctx context.Context) (int64, error) {
	return r.config.Outbox.Pending(ctx, r.config.ConsumerGroup)
}

// Flush waits until every row committed so far is published, or ctx ends.
func (r *SequentialRelay) Flush(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		n, err := r.Pending(ctx)
		if err != nil {
			return fmt.Errorf("outbox: flush: %w", err)
		}
		if n == 0 {
			return nil
		}
		select {
		case r.wake <- struct{}{}:
		default:
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("outbox: flush: %d rows still pending: %w", n, ctx.Err())
		case <-t.C:
		}
	}
}

// Run relays and prunes until ctx is done or Close is called. Failures are
// logged and retried with backoff; Run returns nil.
func (r *SequentialRelay) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { r.pruneLoop(ctx) })
	defer r.broker.drop()

	offset, failures := int64(-1), 0
	for ctx.Err() == nil {
		wake := r.config.Outbox.Wakeup()
		n, next, err := r.batch(ctx, offset)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			offset = -1 // read the acknowledged offset again
			failures++
			wait := backoff(failures, 100*time.Millisecond, 5*time.Second)
			r.config.Logger.Error("outbox relay: batch failed; retrying", err, watermill.LogFields{"in": wait.String(), "failures": failures})
			r.broker.drop()
			if !sleepCtx(ctx, wait) {
				return nil
			}
			continue
		}
		if failures > 0 {
			r.config.Logger.Info("outbox relay: recovered", watermill.LogFields{"after_failures": failures})
		}
		failures, offset = 0, next
		r.once.Do(func() { close(r.running) })
		if n == r.config.BatchSize {
			continue // more is waiting
		}
		t := time.NewTimer(r.config.IdlePoll)
		select {
		case <-ctx.Done():
		case <-wake:
		case <-r.wake:
		case <-t.C:
		}
		t.Stop()
	}
	return nil
}

// batch publishes the rows after offset (-1: after the acknowledged one)
// and returns how many it published and the new offset.
func (r *SequentialRelay) batch(ctx context.Context, offset int64) (int, int64, error) {
	bctx, cancel := context.WithTimeout(ctx, r.config.BatchDeadline)
	defer cancel()
	if _, err := r.broker.ensure(); err != nil {
		return 0, offset, err
	}
	if offset < 0 {
		acked, err := r.config.Outbox.Offset(bctx, r.config.ConsumerGroup)
		if err != nil {
			return 0, offset, err
		}
		offset = acked
	}
	rows, err := r.config.Outbox.Rows(bctx, offset, r.config.BatchSize)
	if err != nil || len(rows) == 0 {
		return 0, offset, err
	}
	for _, row := range rows {
		p, err := broker.Marshaler{}.Marshal(row.Message)
		if err != nil {
			return 0, offset, fmt.Errorf("outbox: marshal row %d: %w", row.Offset, err)
		}
		if err := r.broker.pub.Publish(bctx, r.config.Exchange, row.RoutingKey, p); err != nil {
			return 0, offset, fmt.Errorf("outbox: publish row %d: %w", row.Offset, err)
		}
	}
	if err := r.broker.pub.Wait(bctx); err != nil {
		return 0, offset, fmt.Errorf("outbox: confirms: %w", err)
	}
	last := rows[len(rows)-1].Offset
	// The ack runs even when ctx ended after the confirms: otherwise the
	// batch would only be published again.
	if err := r.config.Outbox.Ack(context.WithoutCancel(bctx), r.config.ConsumerGroup, last); err != nil {
		return 0, offset, err
	}
	return len(rows), last, nil
}

func (r *SequentialRelay) pruneLoop(ctx context.Context) {
	t := time.NewTicker(r.config.PruneInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := r.config.Outbox.Prune(ctx, r.config.Retention); err != nil && ctx.Err() == nil {
				r.config.Logger.Error("outbox relay: prune failed", err, nil)
			}
		}
	}
}

var _ Relay = (*SequentialRelay)(nil)
