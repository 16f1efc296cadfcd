package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// listenerPing is how long the listener waits for a notification before it
// checks that its connection still answers: a peer that vanished without a
// reset (a dropped route) would otherwise leave it waiting forever while
// the relay falls back to IdlePollInterval.
const listenerPing = 30 * time.Second

// setWaiting sets this relay's consumer group as asleep (commands then
// NOTIFY on every outbox insert) or awake in outbox_relay_wakeup, and
// reports whether that worked. Only a change writes: the update is skipped
// when the flag already has the value. The table is unlogged, so the write
// waits for no WAL flush.
func (r *PipelinedRelay) setWaiting(ctx context.Context, waiting bool) bool {
	_, err := r.config.Pool.Exec(ctx, `
		INSERT INTO outbox_relay_wakeup (channel, consumer_group, waiting) VALUES ($1, $2, $3)
		ON CONFLICT (channel, consumer_group) DO UPDATE SET waiting = EXCLUDED.waiting
		WHERE outbox_relay_wakeup.waiting IS DISTINCT FROM EXCLUDED.waiting`,
		r.channel, r.config.ConsumerGroup, waiting)
	if err != nil {
		if ctx.Err() == nil && !r.wakeErrSeen {
			// Logged once: without the table (migration 00003) the relay
			// still relays, waking every IdlePollInterval.
			r.wakeErrSeen = true
			r.config.Logger.Error("outbox relay: cannot set the wake-up flag; polling instead", err, nil)
		}
		return false
	}
	r.wakeErrSeen = false
	return true
}

// listen keeps a connection LISTENing on the outbox's channel and pokes the
// relay on every notification, reconnecting with backoff when it drops.
func (r *PipelinedRelay) listen(ctx context.Context) {
	failures := 0
	for ctx.Err() == nil {
		began := time.Now()
		err := r.listenOnce(ctx)
		r.listening.Store(false)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			failures = 0 // it listened for a while: back off afresh
		}
		failures++
		wait := backoff(failures, 100*time.Millisecond, 5*time.Second)
		r.config.Logger.Info("outbox relay: listener lost; reconnecting", watermill.LogFields{"err": err, "in": wait.String()})
		if !sleepCtx(ctx, wait) {
			return
		}
	}
}

func (r *PipelinedRelay) listenOnce(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, r.config.Pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("outbox: listener connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = conn.Close(cctx)
		cancel()
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{r.channel}.Sanitize()); err != nil {
		return fmt.Errorf("outbox: listen: %w", err)
	}
	r.listening.Store(true)
	// Notifications sent while no one listened are gone: look now.
	r.poke()
	for {
		wctx, cancel := context.WithTimeout(ctx, listenerPing)
		_, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			r.poke()
		case ctx.Err() != nil:
			return ctx.Err()
		case pgconn.Timeout(err):
			// A timeout leaves the connection usable: check it answers.
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			pcancel()
			if err != nil {
				return fmt.Errorf("outbox: listener ping: %w", err)
			}
		default:
			return fmt.Errorf("outbox: wait for notification: %w", err)
		}
	}
}
