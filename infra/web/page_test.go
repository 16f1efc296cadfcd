package web

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/statemill/statemill/infra/apperr"
)

func TestParsePage(t *testing.T) {
	tests := []struct {
		query string
		want  Page
		field string // "" = no error
	}{
		{"", Page{Limit: 20}, ""},
		{"limit=1", Page{Limit: 1}, ""},
		{"limit=100&after=abc", Page{Limit: 100, After: "abc"}, ""},
		{"after=a%2Bb%20c", Page{Limit: 20, After: "a+b c"}, ""},
		{"other=1", Page{Limit: 20}, ""},
		{"limit=0", Page{}, "limit"},
		{"limit=-1", Page{}, "limit"},
		{"limit=101", Page{}, "limit"},
		{"limit=abc", Page{}, "limit"},
		{"limit=1.5", Page{}, "limit"},
		{"limit=", Page{}, "limit"},
		{"limit=99999999999999999999", Page{}, "limit"},
		{"limit=5&limit=6", Page{}, "limit"},
		{"after=a&after=b", Page{}, "after"},
	}
	for _, tc := range tests {
		t.Run(tc.query, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "/things?"+tc.query, nil)
			p, err := ParsePage(r, 20, 100)
			if tc.field == "" {
				if err != nil || p != tc.want {
					t.Fatalf("got %+v, %v; want %+v", p, err, tc.want)
				}
				return
			}
			ae := apperr.As(err)
			if ae == nil || ae.Code != apperr.Invalid || ae.Fields[tc.field] == "" {
				t.Fatalf("err %#v, want Invalid on %q", ae, tc.field)
			}
		})
	}

	r := httptest.NewRequest(http.MethodGet, "/things?limit=%zz", nil)
	if _, err := ParsePage(r, 20, 100); apperr.CodeOf(err) != apperr.Invalid {
		t.Errorf("malformed query: %v", err)
	}
	// Caller bounds are clamped instead of producing nonsense.
	if p, _ := ParsePage(httptest.NewRequest(http.MethodGet, "/", nil), 500, 50); p.Limit != 50 {
		t.Errorf("default above max: %d", p.Limit)
	}
}

func TestSetNextLink(t *testing.T) {
	rec := httptest.NewRecorder()
	SetNextLink(rec, httptest.NewRequest(http.MethodGet, "/api/things?limit=2", nil), "0190c4a8-6b1e", 2)
	if got, want := rec.Header().Get("Link"), `</api/things?limit=2&after=0190c4a8-6b1e>; rel="next"`; got != want {
		t.Errorf("Link %s, want %s", got, want)
	}

	rec = httptest.NewRecorder()
	SetNextLink(rec, httptest.NewRequest(http.MethodGet, "/things/list?state=active&after=old&limit=5", nil), "a b&c", 5)
	if got, want := rec.Header().Get("Link"), `</things/list?state=active&limit=5&after=a+b%26c>; rel="next"`; got != want {
		t.Errorf("Link %s, want %s", got, want)
	}

	rec = httptest.NewRecorder()
	SetNextLink(rec, httptest.NewRequest(http.MethodGet, "/x", nil), "", 5)
	if _, ok := rec.Header()["Link"]; ok {
		t.Error("Link without a next page")
	}
}
