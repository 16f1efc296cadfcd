package commandbus_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/commandbus"
	"github.com/statemill/statemill/infra/envelope"
)

// Test commands and results; each test builds its own bus.
type echoCmd struct{ Text string }

type echoResult struct {
	Text          string
	CorrelationID string
}

type failCmd struct{}

type panicCmd struct{}

type slowCmd struct{}

type blockCmd struct{ N int }

// waitLimit bounds every wait in these tests: nothing here should take long,
// so reaching it means the bus hangs.
const waitLimit = 10 * time.Second

// startBus builds a bus, lets register add handlers, runs it and waits until
// it processes commands. Cleanup closes it and waits for Run to return.
func startBus(t *testing.T, c commandbus.Config, register func(b *commandbus.Bus)) *commandbus.Bus {
	t.Helper()
	b, err := commandbus.NewWithConfig(c)
	if err != nil {
		t.Fatalf("NewWithConfig: %v", err)
	}
	register(b)
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- b.Run(ctx) }()
	select {
	case <-b.Running():
	case err := <-runErr:
		cancel()
		t.Fatalf("Run returned before running: %v", err)
	case <-time.After(waitLimit):
		cancel()
		t.Fatal("bus did not start running")
	}
	t.Cleanup(func() {
		_ = b.Close()
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitLimit):
			t.Error("Run did not return after Close")
		}
	})
	return b
}

func mustHandle[C any, R any](t *testing.T, b *commandbus.Bus, fn func(ctx context.Context, cmd *C) (R, error)) {
	t.Helper()
	if err := commandbus.Handle(b, fn); err != nil {
		t.Fatalf("Handle: %v", err)
	}
}

// sendAsync runs Send in a goroutine and returns a channel with its outcome.
type outcome[R any] struct {
	res R
	err error
}

func sendAsync[R any, C any](ctx context.Context, b *commandbus.Bus, cmd *C) <-chan outcome[R] {
	ch := make(chan outcome[R], 1)
	go func() {
		r, err := commandbus.Send[R](ctx, b, cmd)
		ch <- outcome[R]{r, err}
	}()
	return ch
}

func await[R any](t *testing.T, ch <-chan outcome[R]) outcome[R] {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(waitLimit):
		t.Fatal("Send did not return: the caller hangs")
		return outcome[R]{}
	}
}

func TestSendReturnsResult(t *testing.T) {
	t.Parallel()
	b := startBus(t, commandbus.Config{}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(_ context.Context, c *echoCmd) (echoResult, error) {
			return echoResult{Text: "echo: " + c.Text}, nil
		})
	})
	o := await(t, sendAsync[echoResult](context.Background(), b, &echoCmd{Text: "hi"}))
	if o.err != nil {
		t.Fatalf("Send: %v", o.err)
	}
	if o.res.Text != "echo: hi" {
		t.Fatalf("result = %q, want %q", o.res.Text, "echo: hi")
	}
}

func TestDuplicateHandlerIsRefused(t *testing.T) {
	t.Parallel()
	b, err := commandbus.NewWithConfig(commandbus.Config{})
	if err != nil {
		t.Fatal(err)
	}
	fn := func(context.Context, *echoCmd) (echoResult, error) { return echoResult{}, nil }
	if err := commandbus.Handle(b, fn); err != nil {
		t.Fatalf("first Handle: %v", err)
	}
	if err := commandbus.Handle(b, fn); err == nil {
		t.Fatal("second Handle for the same command type: want an error, got nil")
	}
}

func TestHandlerErrorKeepsCodeMessageAndFields(t *testing.T) {
	t.Parallel()
	b := startBus(t, commandbus.Config{}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(context.Context, *failCmd) (echoResult, error) {
			return echoResult{}, &apperr.Error{
				Code:    apperr.Invalid,
				Message: "validation failed",
				Fields:  map[string]string{"name": "must not be blank", "price": "must not be negative"},
				Err:     errors.New("internal cause that must not cross the bus"),
			}
		})
	})
	o := await(t, sendAsync[echoResult](context.Background(), b, &failCmd{}))
	var ae *apperr.Error
	if !errors.As(o.err, &ae) {
		t.Fatalf("Send error %v (%T) is not an *apperr.Error", o.err, o.err)
	}
	if ae.Code != apperr.Invalid || ae.Message != "validation failed" {
		t.Fatalf("got code %q message %q, want %q %q", ae.Code, ae.Message, apperr.Invalid, "validation failed")
	}
	want := map[string]string{"name": "must not be blank", "price": "must not be negative"}
	if len(ae.Fields) != len(want) {
		t.Fatalf("fields = %v, want %v", ae.Fields, want)
	}
	for k, v := range want {
		if ae.Fields[k] != v {
			t.Fatalf("fields = %v, want %v", ae.Fields, want)
		}
	}
	if apperr.CodeOf(o.err) != apperr.Invalid {
		t.Fatalf("CodeOf = %q", apperr.CodeOf(o.err))
	}
}

func TestHandlerPanicBecomesInternal(t *testing.T) {
	t.Parallel()
	b := startBus(t, commandbus.Config{}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(context.Context, *panicCmd) (echoResult, error) {
			panic("boom")
		})
		mustHandle(t, b, func(_ context.Context, c *echoCmd) (echoResult, error) {
			return echoResult{Text: c.Text}, nil
		})
	})
	o := await(t, sendAsync[echoResult](context.Background(), b, &panicCmd{}))
	if o.err == nil {
		t.Fatal("Send of a panicking command: want an error, got nil")
	}
	if code := apperr.CodeOf(o.err); code != apperr.Internal {
		t.Fatalf("code = %q (%v), want %q", code, o.err, apperr.Internal)
	}
	// The bus survives the panic.
	o2 := await(t, sendAsync[echoResult](context.Background(), b, &echoCmd{Text: "still alive"}))
	if o2.err != nil || o2.res.Text != "still alive" {
		t.Fatalf("after a panic: %+v, %v", o2.res, o2.err)
	}
}

func TestTimeoutIsUnavailable(t *testing.T) {
	t.Parallel()
	sawCancel := make(chan error, 1)
	b := startBus(t, commandbus.Config{Timeout: 150 * time.Millisecond}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(ctx context.Context, _ *slowCmd) (echoResult, error) {
			select {
			case <-ctx.Done():
				sawCancel <- ctx.Err()
				return echoResult{}, ctx.Err()
			case <-time.After(waitLimit):
				sawCancel <- nil
				return echoResult{Text: "too late"}, nil
			}
		})
	})
	start := time.Now()
	o := await(t, sendAsync[echoResult](context.Background(), b, &slowCmd{}))
	if code := apperr.CodeOf(o.err); code != apperr.Unavailable {
		t.Fatalf("code = %q (%v), want %q", code, o.err, apperr.Unavailable)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("Send took %v with a 150ms timeout", el)
	}
	select {
	case err := <-sawCancel:
		if err == nil {
			t.Fatal("the handler's ctx was never cancelled: the timeout does not reach the handler")
		}
	case <-time.After(waitLimit):
		t.Fatal("the handler did not finish")
	}
}

func TestCommandsRunConcurrently(t *testing.T) {
	t.Parallel()
	const n = 50
	var arrived atomic.Int32
	all := make(chan struct{})
	b := startBus(t, commandbus.Config{}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(ctx context.Context, c *blockCmd) (int, error) {
			if arrived.Add(1) == n {
				close(all)
			}
			select {
			case <-all:
				return c.N, nil
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		})
	})
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			got, err := commandbus.Send[int](context.Background(), b, &blockCmd{N: i})
			if err != nil {
				errs <- err
				return
			}
			if got != i {
				errs <- errors.New("a reply went to the wrong caller")
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitLimit):
		t.Fatalf("only %d of %d commands reached their handler: commands do not run concurrently", arrived.Load(), n)
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := arrived.Load(); got != n {
		t.Fatalf("handler ran %d times, want %d", got, n)
	}
}

func TestCorrelationIDReachesHandler(t *testing.T) {
	t.Parallel()
	b := startBus(t, commandbus.Config{}, func(b *commandbus.Bus) {
		mustHandle(t, b, func(ctx context.Context, c *echoCmd) (echoResult, error) {
			return echoResult{Text: c.Text, CorrelationID: envelope.CorrelationID(ctx)}, nil
		})
	})
	ctx := envelope.WithCorrelationID(context.Background(), "req-42-abc")
	o := await(t, sendAsync[echoResult](ctx, b, &echoCmd{Text: "x"}))
	if o.err != nil {
		t.Fatal(o.err)
	}
	if o.res.CorrelationID != "req-42-abc" {
		t.Fatalf("handler saw correlation id %q, want %q", o.res.CorrelationID, "req-42-abc")
	}
	// Without one, the handler sees none (no leak between commands).
	o = await(t, sendAsync[echoResult](context.Background(), b, &echoCmd{Text: "y"}))
	if o.err != nil {
		t.Fatal(o.err)
	}
	if o.res.CorrelationID != "" {
		t.Fatalf("handler saw correlation id %q without one set", o.res.CorrelationID)
	}
}

func TestCloseWaitsForInFlightCommand(t *testing.T) {
	t.Parallel()
	started := make(chan struct{})
	release := make(chan struct{})
	var finished atomic.Bool
	b, err := commandbus.NewWithConfig(commandbus.Config{CloseTimeout: waitLimit})
	if err != nil {
		t.Fatal(err)
	}
	mustHandle(t, b, func(_ context.Context, c *echoCmd) (echoResult, error) {
		close(started)
		<-release
		finished.Store(true)
		return echoResult{Text: c.Text}, nil
	})
	runErr := make(chan error, 1)
	go func() { runErr <- b.Run(context.Background()) }()
	select {
	case <-b.Running():
	case <-time.After(waitLimit):
		t.Fatal("bus did not start")
	}

	sent := sendAsync[echoResult](context.Background(), b, &echoCmd{Text: "in flight"})
	select {
	case <-started:
	case <-time.After(waitLimit):
		t.Fatal("handler did not start")
	}

	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a command was in flight", err)
	case <-time.After(200 * time.Millisecond):
		// Close is still waiting, as it should.
	}
	close(release)
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Close did not return after the command finished")
	}
	if !finished.Load() {
		t.Fatal("Close returned before the in-flight handler finished")
	}
	// The caller of the in-flight command gets its outcome, not an error:
	// the command ran to completion (and may have committed).
	o := await(t, sent)
	if o.err != nil {
		t.Fatalf("in-flight Send during Close: %v (code %s)", o.err, apperr.CodeOf(o.err))
	}
	if o.res.Text != "in flight" {
		t.Fatalf("in-flight result = %q", o.res.Text)
	}
	select {
	case err := <-runErr:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Run did not return after Close")
	}

	// After Close a Send fails at once instead of hanging.
	o = await(t, sendAsync[echoResult](context.Background(), b, &echoCmd{Text: "late"}))
	if o.err == nil {
		t.Fatal("Send after Close: want an error, got nil")
	}
}
