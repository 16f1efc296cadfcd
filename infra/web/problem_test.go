package web

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/statemill/statemill/infra/apperr"
)

func TestStatusOf(t *testing.T) {
	want := map[apperr.Code]int{
		apperr.Invalid:            422,
		apperr.Malformed:          400,
		apperr.NotFound:           404,
		apperr.Conflict:           409,
		apperr.PreconditionFailed: 412,
		apperr.TooLarge:           413,
		apperr.UnsupportedMedia:   415,
		apperr.Unavailable:        503,
		apperr.Internal:           500,
		"":                        500,
		"no_such_code":            500,
	}
	for code, status := range want {
		if got := StatusOf(code); got != status {
			t.Errorf("StatusOf(%q) = %d, want %d", code, got, status)
		}
	}
}

func TestWriteErrorShapePerCode(t *testing.T) {
	codes := []apperr.Code{apperr.Invalid, apperr.Malformed, apperr.NotFound, apperr.Conflict,
		apperr.PreconditionFailed, apperr.TooLarge, apperr.UnsupportedMedia, apperr.Unavailable, apperr.Internal}
	captureLogs(t)
	for _, code := range codes {
		t.Run(string(code), func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/things/7", nil)
			r = r.WithContext(WithRequestID(r.Context(), "rid-1"))
			rec := httptest.NewRecorder()
			WriteError(rec, r, &apperr.Error{Code: code, Message: "the message", Fields: map[string]string{"f": "bad"}})

			p := decodeProblem(t, rec)
			status := StatusOf(code)
			if rec.Code != status {
				t.Fatalf("status %d, want %d", rec.Code, status)
			}
			if p.Type != ProblemTypeBase+string(code) || p.Title != http.StatusText(status) ||
				p.Instance != "/things/7" || p.RequestID != "rid-1" {
				t.Errorf("problem %+v", p)
			}
			if code == apperr.Internal {
				if p.Detail == "the message" || p.Errors != nil {
					t.Errorf("internal problem leaks: %+v", p)
				}
			} else if p.Detail != "the message" || p.Errors["f"] != "bad" {
				t.Errorf("problem %+v", p)
			}
			if got := rec.Header().Get("Retry-After"); (code == apperr.Unavailable) != (got == "1") {
				t.Errorf("Retry-After = %q", got)
			}
		})
	}
}

func TestWriteErrorExactJSON(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/things", nil)
	rec := httptest.NewRecorder()
	WriteError(rec, r, apperr.Field("name", "must not be blank"))
	want := `{"type":"https://statemill.dev/problems/invalid","title":"Unprocessable Entity","status":422,"detail":"validation failed","instance":"/things","errors":{"name":"must not be blank"}}` + "\n"
	if rec.Body.String() != want {
		t.Errorf("body\n got %s\nwant %s", rec.Body, want)
	}
}

func TestWriteErrorInternalDoesNotLeak(t *testing.T) {
	logs := captureLogs(t)
	secret := "pq: password authentication failed for user admin at 10.0.0.3"
	r := httptest.NewRequest(http.MethodGet, "/x", nil)
	r = r.WithContext(WithRequestID(r.Context(), "rid-secret"))
	for _, err := range []error{
		errors.New(secret), // a foreign error
		apperr.Wrap(apperr.Internal, errors.New(secret), "load "+secret), // an Internal with a careless message
		&apperr.Error{Code: "bogus", Message: secret},                    // an unknown code
		fmt.Errorf("wrapped: %w", errors.New(secret)),
	} {
		rec := httptest.NewRecorder()
		WriteError(rec, r, err)
		if rec.Code != 500 || strings.Contains(rec.Body.String(), "password") {
			t.Errorf("reply %d %s", rec.Code, rec.Body)
		}
		p := decodeProblem(t, rec)
		if p.Type != ProblemTypeBase+"internal" {
			t.Errorf("type %q", p.Type)
		}
	}
	out := logs.String()
	if !strings.Contains(out, "password authentication failed") || !strings.Contains(out, `"request_id":"rid-secret"`) {
		t.Errorf("log lacks the cause or the request id:\n%s", out)
	}
}

func TestWriteErrorDeadlineIsUnavailable(t *testing.T) {
	captureLogs(t)
	rec := httptest.NewRecorder()
	WriteError(rec, httptest.NewRequest(http.MethodGet, "/", nil), fmt.Errorf("query: %w", context.DeadlineExceeded))
	if rec.Code != 503 || rec.Header().Get("Retry-After") != "1" {
		t.Fatalf("%d %v", rec.Code, rec.Header())
	}
	if p := decodeProblem(t, rec); strings.Contains(p.Detail, "deadline") {
		t.Errorf("detail leaks the cause: %q", p.Detail)
	}
}

func TestWriteErrorNil(t *testing.T) {
	captureLogs(t)
	rec := httptest.NewRecorder()
	WriteError(rec, httptest.NewRequest(http.MethodGet, "/", nil), nil)
	if rec.Code != 500 {
		t.Fatalf("status %d", rec.Code)
	}
}

func TestWriteJSON(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteJSON(rec, http.StatusCreated, map[string]any{"id": "a<b", "n": 1})
	if rec.Code != 201 || rec.Header().Get("Content-Type") != "application/json" ||
		rec.Body.String() != `{"id":"a\u003cb","n":1}`+"\n" {
		t.Errorf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}

	captureLogs(t)
	rec = httptest.NewRecorder()
	WriteJSON(rec, http.StatusOK, math.Inf(1)) // unencodable: no half-written 200
	if rec.Code != 500 {
		t.Fatalf("status %d", rec.Code)
	}
	decodeProblem(t, rec)

	rec = httptest.NewRecorder()
	WriteJSON(rec, http.StatusNoContent, "ignored")
	if rec.Code != 204 || rec.Body.Len() != 0 {
		t.Errorf("204 with body %q", rec.Body)
	}
}
