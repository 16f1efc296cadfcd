package web

import (
	"net/http"
	"testing"
	"time"
)

func TestNewServer(t *testing.T) {
	h := http.NotFoundHandler()
	s := NewServer(":0", h)
	if s.Addr != ":0" || s.Handler == nil || s.ErrorLog == nil ||
		s.ReadHeaderTimeout != 5*time.Second || s.ReadTimeout != 15*time.Second ||
		s.WriteTimeout != 30*time.Second || s.IdleTimeout != 120*time.Second || s.MaxHeaderBytes != 64<<10 {
		t.Fatalf("%+v", s)
	}
}
