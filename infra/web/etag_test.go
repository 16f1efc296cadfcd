package web

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/statemill/statemill/infra/apperr"
)

func TestETag(t *testing.T) {
	if got := ETag(3); got != `"3"` {
		t.Errorf("ETag(3) = %s", got)
	}
}

func TestIfMatch(t *testing.T) {
	tests := []struct {
		name    string
		header  []string // nil = absent
		version int64
		ok      bool
		code    apperr.Code
	}{
		{"absent", nil, 0, false, ""},
		{"star", []string{"*"}, 0, false, ""},
		{"round trip", []string{ETag(42)}, 42, true, ""},
		{"zero", []string{`"0"`}, 0, true, ""},
		{"max", []string{ETag(9223372036854775807)}, 9223372036854775807, true, ""},
		{"spaces", []string{`  "5"  `}, 5, true, ""},
		{"weak", []string{`W/"5"`}, 0, false, apperr.PreconditionFailed},
		{"not a number", []string{`"abc"`}, 0, false, apperr.PreconditionFailed},
		{"negative", []string{`"-1"`}, 0, false, apperr.PreconditionFailed},
		{"plus sign", []string{`"+5"`}, 0, false, apperr.PreconditionFailed},
		{"leading zero", []string{`"05"`}, 0, false, apperr.PreconditionFailed},
		{"overflow", []string{`"99999999999999999999"`}, 0, false, apperr.PreconditionFailed},
		{"empty tag", []string{`""`}, 0, false, apperr.PreconditionFailed},
		{"list", []string{`"1", "2"`}, 0, false, apperr.PreconditionFailed},
		{"two headers", []string{`"1"`, `"2"`}, 0, false, apperr.PreconditionFailed},
		{"unquoted", []string{`5`}, 0, false, apperr.Malformed},
		{"half quoted", []string{`"5`}, 0, false, apperr.Malformed},
		{"empty", []string{``}, 0, false, apperr.Malformed},
		{"star in list", []string{`*, "1"`}, 0, false, apperr.Malformed},
		{"garbage", []string{"\x01\x02"}, 0, false, apperr.Malformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/", nil)
			if tc.header != nil {
				r.Header["If-Match"] = tc.header
			}
			v, ok, err := IfMatch(r)
			if code := apperr.CodeOf(err); code != tc.code {
				t.Fatalf("code %q, want %q (%v)", code, tc.code, err)
			}
			if v != tc.version || ok != tc.ok {
				t.Fatalf("got (%d, %v), want (%d, %v)", v, ok, tc.version, tc.ok)
			}
		})
	}
}
