package web_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/web"
)

// On stop, the server finishes its requests first, then Drain runs, and
// only then does the background work see its context end; a failing
// background task stops the whole and its error comes back.
func TestLifecycleStopsInOrder(t *testing.T) {
	var mu sync.Mutex
	var order []string
	note := func(s string) { mu.Lock(); order = append(order, s); mu.Unlock() }

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	inRequest := make(chan struct{})
	release := make(chan struct{})
	srv := web.NewServer("", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(inRequest)
		<-release
		note("request done")
	}))
	srv.RegisterOnShutdown(func() { close(release) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- web.Lifecycle{
			Server: srv, Listener: ln,
			Background: func(ctx context.Context) error { <-ctx.Done(); note("background stopped"); return ctx.Err() },
			Drain:      func(context.Context) error { note("drained"); return nil },
		}.Run(ctx)
	}()
	go func() { _, _ = http.Get("http://" + ln.Addr().String()) }()
	select {
	case <-inRequest:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never arrived")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(order) != 3 || order[0] != "request done" || order[1] != "drained" || order[2] != "background stopped" {
		t.Fatalf("stop order %v, want request done, drained, background stopped", order)
	}

	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err = web.Lifecycle{
		Server: web.NewServer("", http.NotFoundHandler()), Listener: ln2,
		Background: func(context.Context) error { return boom },
	}.Run(context.Background())
	if !errors.Is(err, boom) {
		t.Fatalf("Run with a failing task = %v, want it", err)
	}
}
