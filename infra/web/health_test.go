package web

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func getHealth(t *testing.T, h http.Handler) (int, Health, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
	var body Health
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatalf("%v: %s", err, rec.Body)
	}
	return rec.Code, body, rec.Body.String()
}

func TestHealthOK(t *testing.T) {
	code, body, _ := getHealth(t, HealthHandler(map[string]func(context.Context) error{
		"db":     func(context.Context) error { return nil },
		"broker": func(context.Context) error { return nil },
	}))
	if code != 200 || body.Status != "ok" || body.Checks["db"] != "ok" || body.Checks["broker"] != "ok" {
		t.Fatalf("%d %+v", code, body)
	}
	code, body, raw := getHealth(t, HealthHandler(nil))
	if code != 200 || body.Status != "ok" || !strings.Contains(raw, `"checks":{}`) {
		t.Fatalf("no checks: %d %s", code, raw)
	}
}

func TestHealthFailures(t *testing.T) {
	logs := captureLogs(t)
	release := make(chan struct{})
	defer close(release)
	start := time.Now()
	code, body, raw := getHealth(t, HealthHandler(map[string]func(context.Context) error{
		"db":     func(context.Context) error { return nil },
		"broker": func(context.Context) error { return errors.New("dial tcp 10.1.2.3:5672: refused") },
		"slow": func(ctx context.Context) error { // honours its context
			<-ctx.Done()
			return ctx.Err()
		},
		"stuck":  func(context.Context) error { <-release; return nil }, // ignores it
		"panics": func(context.Context) error { panic("bug") },
	}))
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Fatalf("took %v", elapsed)
	}
	want := map[string]string{"db": "ok", "broker": "failed", "slow": "timeout", "stuck": "timeout", "panics": "failed"}
	if code != 503 || body.Status != "unavailable" {
		t.Fatalf("%d %+v", code, body)
	}
	for k, v := range want {
		if body.Checks[k] != v {
			t.Errorf("check %s = %q, want %q", k, body.Checks[k], v)
		}
	}
	if strings.Contains(raw, "10.1.2.3") {
		t.Error("reply leaks the error text")
	}
	if !strings.Contains(logs.String(), "10.1.2.3") {
		t.Error("failure not logged")
	}
}
