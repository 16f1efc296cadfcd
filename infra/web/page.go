package web

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/statemill/statemill/infra/apperr"
)

// Page is a keyset page request: at most Limit items after the cursor After.
type Page struct {
	Limit int
	After string // raw ?after=; "" for the first page. The caller validates it.
}

// ParsePage reads ?limit= and ?after=. An absent limit is defaultLimit; a
// given one must be an integer from 1 to maxLimit, else Invalid with field
// "limit". Each parameter may appear at most once: with two values the
// server would have to guess. Bad bounds from the caller are clamped
// (maxLimit at least 1, defaultLimit within 1..maxLimit).
func ParsePage(r *http.Request, defaultLimit, maxLimit int) (Page, error) {
	maxLimit = max(maxLimit, 1)
	if defaultLimit < 1 || defaultLimit > maxLimit {
		defaultLimit = maxLimit
	}
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return Page{}, apperr.Errorf(apperr.Invalid, "the query string is malformed")
	}
	fields := apperr.Fields{}
	p := Page{Limit: defaultLimit}
	if vs, ok := q["limit"]; ok {
		n, err := strconv.Atoi(vs[0])
		switch {
		case len(vs) > 1:
			fields.Add("limit", "must be given at most once")
		case err != nil || n < 1 || n > maxLimit:
			fields.Add("limit", fmt.Sprintf("must be an integer between 1 and %d", maxLimit))
		default:
			p.Limit = n
		}
	}
	if vs, ok := q["after"]; ok {
		if len(vs) > 1 {
			fields.Add("after", "must be given at most once")
		} else {
			p.After = vs[0]
		}
	}
	if err := fields.Err(); err != nil {
		return Page{}, err
	}
	return p, nil
}

// SetNextLink adds `Link: <path?limit=N&after=X>; rel="next"` pointing at the
// page after cursor after. Other query parameters (filters) are kept, so the
// next page lists the same selection; the reference is relative to the
// request, as RFC 8288 allows. Call it only when there is a next page; an
// empty after adds nothing.
func SetNextLink(w http.ResponseWriter, r *http.Request, after string, limit int) {
	if after == "" {
		return
	}
	q := r.URL.Query()
	q.Del("limit")
	q.Del("after")
	var b strings.Builder
	b.WriteString(r.URL.EscapedPath())
	b.WriteByte('?')
	if rest := q.Encode(); rest != "" {
		b.WriteString(rest)
		b.WriteByte('&')
	}
	b.WriteString("limit=" + strconv.Itoa(limit) + "&after=" + url.QueryEscape(after))
	w.Header().Add("Link", "<"+b.String()+`>; rel="next"`)
}
