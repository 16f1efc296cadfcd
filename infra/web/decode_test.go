package web

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
)

type inner struct {
	City string `json:"city"`
}

type sample struct {
	Name    string    `json:"name"`
	Price   int64     `json:"price"`
	Count   int32     `json:"count"`
	Ratio   float64   `json:"ratio"`
	Active  bool      `json:"active"`
	Tags    []string  `json:"tags"`
	Address inner     `json:"address"`
	Ref     uuid.UUID `json:"ref"`
	Opt     *int      `json:"opt"`
}

func jsonRequest(body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/things", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	return r
}

func TestDecodeJSONCorpus(t *testing.T) {
	big := `{"name":"` + strings.Repeat("a", 2<<20) + `"}` // 2 MiB
	deep := strings.Repeat("[", 200_000)                   // nesting bomb under the size cap

	tests := []struct {
		name        string
		body        string
		contentType string // "" = application/json; "-" = no header
		code        apperr.Code
		field       string // expected key in Fields, if any
		check       func(*testing.T, sample)
	}{
		{name: "valid", body: `{"name":"candy","price":100,"count":2,"ratio":0.5,"active":true,"tags":["a"],"address":{"city":"X"},"ref":"0190c4a8-6b1e-7000-8000-000000000001","opt":null}`,
			check: func(t *testing.T, s sample) {
				if s.Name != "candy" || s.Price != 100 || s.Address.City != "X" || s.Ref == uuid.Nil {
					t.Errorf("decoded %+v", s)
				}
			}},
		{name: "trailing whitespace ok", body: "{\"name\":\"a\"}\n\t \r\n"},
		{name: "charset param ok", body: `{}`, contentType: "application/json; charset=UTF-8"},
		{name: "unicode accepted", body: `{"name":"caf\u00e9 \ud83c\udf6c 漢字 \u0000 \ud800 ` + "\xff\xfe" + ` \u202e"}`,
			check: func(t *testing.T, s sample) {
				if !strings.Contains(s.Name, "漢字") || !strings.Contains(s.Name, "\U0001F36C") {
					t.Errorf("name %q", s.Name)
				}
			}},
		{name: "max int64 ok", body: `{"price":9223372036854775807}`},
		{name: "null body leaves dst", body: `null`},

		{name: "no content type", body: `{}`, contentType: "-", code: apperr.UnsupportedMedia},
		{name: "text/plain", body: `{}`, contentType: "text/plain", code: apperr.UnsupportedMedia},
		{name: "form", body: `name=a`, contentType: "application/x-www-form-urlencoded", code: apperr.UnsupportedMedia},
		{name: "json suffix type", body: `{}`, contentType: "application/problem+json", code: apperr.UnsupportedMedia},
		{name: "latin1 charset", body: `{}`, contentType: "application/json; charset=latin1", code: apperr.UnsupportedMedia},
		{name: "garbled content type", body: `{}`, contentType: "application/json; ;;=", code: apperr.UnsupportedMedia},

		{name: "2 MiB body", body: big, code: apperr.TooLarge},

		{name: "empty body", body: ``, code: apperr.Invalid},
		{name: "only whitespace", body: " \n ", code: apperr.Invalid},
		{name: "broken json", body: `{"name":`, code: apperr.Invalid},
		{name: "not json", body: `hello`, code: apperr.Invalid},
		{name: "single quotes", body: `{'name':'a'}`, code: apperr.Invalid},
		{name: "trailing comma", body: `{"name":"a",}`, code: apperr.Invalid},
		{name: "nesting bomb", body: deep, code: apperr.Invalid},
		{name: "string for int", body: `{"price":"100"}`, code: apperr.Invalid, field: "price"},
		{name: "fraction for int", body: `{"price":1.5}`, code: apperr.Invalid, field: "price"},
		{name: "1e30 overflow", body: `{"price":1e30}`, code: apperr.Invalid, field: "price"},
		{name: "20 digit overflow", body: `{"price":99999999999999999999}`, code: apperr.Invalid, field: "price"},
		{name: "int32 overflow", body: `{"count":2147483648}`, code: apperr.Invalid, field: "count"},
		{name: "number for string", body: `{"name":5}`, code: apperr.Invalid, field: "name"},
		{name: "string for bool", body: `{"active":"yes"}`, code: apperr.Invalid, field: "active"},
		{name: "object for array", body: `{"tags":{}}`, code: apperr.Invalid, field: "tags"},
		{name: "nested wrong type", body: `{"address":{"city":1}}`, code: apperr.Invalid, field: "address.city"},
		{name: "number for uuid", body: `{"ref":1}`, code: apperr.Invalid, field: "ref"},
		{name: "bad uuid text", body: `{"ref":"nope"}`, code: apperr.Invalid},
		{name: "array body", body: `[1,2]`, code: apperr.Invalid},
		{name: "unknown field", body: `{"name":"a","colour":"red"}`, code: apperr.Invalid, field: "colour"},
		{name: "trailing garbage", body: `{"name":"a"} x`, code: apperr.Invalid},
		{name: "two objects", body: `{}{}`, code: apperr.Invalid},
		{name: "trailing brace", body: `{}}`, code: apperr.Invalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := jsonRequest(tc.body)
			switch tc.contentType {
			case "":
			case "-":
				r.Header.Del("Content-Type")
			default:
				r.Header.Set("Content-Type", tc.contentType)
			}
			var dst sample
			err := DecodeJSON(r, httptest.NewRecorder(), &dst)
			if tc.code == "" {
				if err != nil {
					t.Fatalf("DecodeJSON: %v", err)
				}
				if tc.check != nil {
					tc.check(t, dst)
				}
				return
			}
			var ae *apperr.Error
			if !errors.As(err, &ae) {
				t.Fatalf("err = %#v, want *apperr.Error", err)
			}
			if ae.Code != tc.code {
				t.Fatalf("code = %s, want %s (%v)", ae.Code, tc.code, ae)
			}
			if s := StatusOf(ae.Code); s >= 500 {
				t.Fatalf("client input mapped to %d", s)
			}
			if ae.Message == "" {
				t.Error("empty message")
			}
			if tc.field != "" && ae.Fields[tc.field] == "" {
				t.Errorf("Fields = %v, want a message for %q", ae.Fields, tc.field)
			}
		})
	}
}

func TestDecodeJSONMessages(t *testing.T) {
	var dst sample
	err := apperr.As(DecodeJSON(jsonRequest(`{"price":1e30}`), nil, &dst))
	if got, want := err.Fields["price"], "must be an integer between -9223372036854775808 and 9223372036854775807"; got != want {
		t.Errorf("price message %q, want %q", got, want)
	}
	err = apperr.As(DecodeJSON(jsonRequest(`{"ref":1}`), nil, &dst))
	if got := err.Fields["ref"]; got != "must be a string" {
		t.Errorf("ref message %q", got)
	}
	err = apperr.As(DecodeJSON(jsonRequest(`{"colour":1}`), nil, &dst))
	if got := err.Fields["colour"]; got != "unknown field" {
		t.Errorf("colour message %q", got)
	}
	err = apperr.As(DecodeJSON(jsonRequest(`[]`), nil, &dst))
	if err.Message != "request body must be an object" {
		t.Errorf("array body message %q", err.Message)
	}
}

func TestDecodeJSONDeclaredLengthTooLarge(t *testing.T) {
	r := jsonRequest(`{}`)
	r.ContentLength = MaxBodyBytes + 1
	if code := apperr.CodeOf(DecodeJSON(r, nil, &sample{})); code != apperr.TooLarge {
		t.Fatalf("code %s", code)
	}
}

func TestDecodeJSONExactlyAtLimit(t *testing.T) {
	pad := MaxBodyBytes - len(`{"name":""}`)
	body := `{"name":"` + strings.Repeat("a", pad) + `"}`
	if len(body) != MaxBodyBytes {
		t.Fatal(len(body))
	}
	if err := DecodeJSON(jsonRequest(body), nil, &sample{}); err != nil {
		t.Fatalf("body of exactly MaxBodyBytes: %v", err)
	}
	// A valid object inside the limit followed by padding beyond it is too large.
	over := `{}` + strings.Repeat(" ", MaxBodyBytes)
	if code := apperr.CodeOf(DecodeJSON(jsonRequest(over), nil, &sample{})); code != apperr.TooLarge {
		t.Fatalf("padding beyond the limit: %s", code)
	}
}

func TestDecodeJSONReadFailure(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/", io.MultiReader(strings.NewReader(`{"na`), iotest.ErrReader(io.ErrClosedPipe)))
	r.Header.Set("Content-Type", "application/json")
	err := DecodeJSON(r, nil, &sample{})
	if code := apperr.CodeOf(err); code != apperr.Malformed {
		t.Fatalf("code %s (%v)", code, err)
	}
}

func TestDecodeJSONBadDestinationIsInternal(t *testing.T) {
	var s sample
	if code := apperr.CodeOf(DecodeJSON(jsonRequest(`{}`), nil, s)); code != apperr.Internal {
		t.Fatalf("non-pointer dst: %s", code)
	}
}

// Through a real server, so MaxBytesReader talks to net/http's own writer
// behind the middleware wrappers: a huge body is a 413 problem, never a 5xx.
func TestDecodeJSONOverHTTP(t *testing.T) {
	h := Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var s sample
		if err := DecodeJSON(r, w, &s); err != nil {
			WriteError(w, r, err)
			return
		}
		WriteJSON(w, http.StatusOK, s)
	}), RequestID, Log, Recover)
	captureLogs(t)
	srv := httptest.NewServer(h)
	defer srv.Close()

	for _, tc := range []struct {
		body   io.Reader
		status int
	}{
		{strings.NewReader(`{"name":"a"}`), http.StatusOK},
		{bytes.NewReader(bytes.Repeat([]byte(" "), 3<<20)), http.StatusRequestEntityTooLarge},
		{io.MultiReader(strings.NewReader(`{"name":"`), io.LimitReader(neverEnding('a'), 4<<20)), http.StatusRequestEntityTooLarge}, // chunked, no length
		{strings.NewReader(`{"price":99999999999999999999}`), http.StatusUnprocessableEntity},
	} {
		resp, err := http.Post(srv.URL, "application/json", tc.body)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("status %d, want %d", resp.StatusCode, tc.status)
		}
	}
}

type neverEnding byte

func (b neverEnding) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}
