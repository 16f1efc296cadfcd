package web

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"
)

// Lifecycle runs an HTTP server beside a service's background work, and
// stops them in the order that loses nothing: the server stops taking
// requests and finishes those in flight, then Drain runs (commands finish,
// the relay publishes what was committed), and only then does the
// background work stop.
type Lifecycle struct {
	Server   *http.Server
	Listener net.Listener
	// Background runs on a context of its own until the server and Drain
	// stopped; its failure stops the whole.
	Background func(context.Context) error
	// Accepting, when set, holds the listener back until it is closed (a
	// command sent before the command bus runs would wait out its timeout).
	Accepting <-chan struct{}
	// Serving is called once the server serves (to log or print the URL).
	Serving func()
	// Drain, when set, runs after the server stopped.
	Drain func(context.Context) error
	// ShutdownTimeout bounds the server's shutdown and Drain. Default 20s.
	ShutdownTimeout time.Duration
}

// Run serves until ctx is done or the background work fails, then stops.
func (l Lifecycle) Run(ctx context.Context) error {
	if l.ShutdownTimeout == 0 {
		l.ShutdownTimeout = 20 * time.Second
	}
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	g, gctx := errgroup.WithContext(workCtx)
	if l.Background != nil {
		g.Go(func() error { return l.Background(gctx) })
	}
	g.Go(func() error {
		if l.Accepting != nil {
			select {
			case <-l.Accepting:
			case <-gctx.Done():
				return nil
			}
		}
		if l.Serving != nil {
			l.Serving()
		}
		if err := l.Server.Serve(l.Listener); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})

	select {
	case <-ctx.Done():
	case <-gctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), l.ShutdownTimeout)
	defer cancel()
	var errs []error
	if err := l.Server.Shutdown(shutdownCtx); err != nil {
		errs = append(errs, fmt.Errorf("http shutdown: %w", err))
	}
	if l.Drain != nil {
		if err := l.Drain(shutdownCtx); err != nil {
			errs = append(errs, err)
		}
	}
	stopWork()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
