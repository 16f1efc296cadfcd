package web

import (
	"log/slog"
	"net/http"
	"time"
)

// Server timeouts. ReadHeaderTimeout stops Slowloris (gosec G112);
// ReadTimeout bounds a slow body (at most MaxBodyBytes); WriteTimeout bounds a
// handler plus its reply; IdleTimeout reaps idle keep-alive connections.
// Streaming handlers (server-sent events) must extend their own write
// deadline with http.ResponseController.SetWriteDeadline.
const (
	ReadHeaderTimeout = 5 * time.Second
	ReadTimeout       = 15 * time.Second
	WriteTimeout      = 30 * time.Second
	IdleTimeout       = 120 * time.Second
	MaxHeaderBytes    = 64 << 10
)

// NewServer returns an http.Server for h on addr with the timeouts above and
// net/http's own complaints (TLS handshake failures, hijack misuse, panics
// outside Recover) sent to slog.Default() at warn level, as of this call.
func NewServer(addr string, h http.Handler) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
	}
}
