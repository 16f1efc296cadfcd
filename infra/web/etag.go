package web

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/statemill/statemill/infra/apperr"
)

// ETag returns the strong entity tag of a version: the decimal number in
// quotes, e.g. `"3"`. Versions only grow, so equal tags mean equal state.
func ETag(version int64) string {
	return `"` + strconv.FormatInt(version, 10) + `"`
}

// IfMatch reads the If-Match header of a conditional command.
//
//   - absent, or "*": ok is false and the command runs unconditionally
//     ("*" only asks that the entity exist, which the command checks anyway);
//   - one tag made by ETag: its version, ok true; the caller compares it with
//     the current version and answers PreconditionFailed on a mismatch;
//   - syntactically valid tags that can never match one of ours (a weak
//     W/"3" — If-Match compares strongly, RFC 9110 §13.1.1 —, a non-numeric
//     or negative "abc", or a list of several tags, since a command targets
//     exactly one version): PreconditionFailed (412), the status RFC 9110
//     gives a condition that evaluates to false;
//   - text that is not an entity tag at all (3 without quotes, an empty
//     value): Malformed (400).
func IfMatch(r *http.Request) (version int64, ok bool, err error) {
	values := r.Header.Values("If-Match")
	if len(values) == 0 {
		return 0, false, nil
	}
	var tags []string
	for _, v := range values {
		for t := range strings.SplitSeq(v, ",") {
			if t = strings.TrimSpace(t); t != "" {
				tags = append(tags, t)
			}
		}
	}
	if len(tags) == 1 && tags[0] == "*" {
		return 0, false, nil
	}
	if len(tags) == 0 {
		return 0, false, apperr.Errorf(apperr.Malformed, "If-Match is empty; send an ETag or *")
	}
	for _, t := range tags {
		if !isEntityTag(t) {
			return 0, false, apperr.Errorf(apperr.Malformed, "If-Match must hold an entity tag such as %s", ETag(1))
		}
	}
	if len(tags) > 1 {
		return 0, false, apperr.Errorf(apperr.PreconditionFailed, "If-Match must hold exactly one entity tag")
	}
	t := tags[0]
	if strings.HasPrefix(t, "W/") {
		return 0, false, apperr.Errorf(apperr.PreconditionFailed, "If-Match needs a strong entity tag; weak tags never match")
	}
	v, perr := strconv.ParseInt(t[1:len(t)-1], 10, 64)
	if perr != nil || v < 0 || ETag(v) != t { // ETag(v) != t refuses "+3", "03"
		return 0, false, apperr.Errorf(apperr.PreconditionFailed, "If-Match %s does not match the current version", t)
	}
	return v, true, nil
}

// isEntityTag reports whether t is an entity-tag (RFC 9110 §8.8.3):
// [W/] DQUOTE *etagc DQUOTE, etagc being visible ASCII but '"', or obs-text.
func isEntityTag(t string) bool {
	t = strings.TrimPrefix(t, "W/")
	if len(t) < 2 || t[0] != '"' || t[len(t)-1] != '"' {
		return false
	}
	for i := 1; i < len(t)-1; i++ {
		if c := t[i]; c == '"' || c < 0x21 || c == 0x7f {
			return false
		}
	}
	return true
}
